"""The generated task suite: determinism, splits, known answers, scoring and JSONL files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quiver.tasks import (HELD_IN, HELD_OUT, SPLITS, TASKS, Example, Task, exact_match,
                          exact_match_ci, export, get_task, normalize, read_jsonl, split_of,
                          write_jsonl)

_DIGEST_SCRIPT = """
import hashlib, json
from quiver.tasks import TASKS
rows = [ex.to_dict() for task in TASKS.values() for split in ("train", "validation", "test")
        for ex in task.examples(split, 20)]
print(hashlib.sha256(json.dumps(rows).encode()).hexdigest())
"""


def _digest_here() -> str:
    import hashlib
    rows = [ex.to_dict() for task in TASKS.values() for split in SPLITS
            for ex in task.examples(split, 20)]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


# -- determinism and splits --------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TASKS))
def test_examples_are_deterministic_and_prefix_stable(name):
    task = get_task(name)
    first, again = task.examples("train", 40), task.examples("train", 40)
    assert first == again
    assert task.examples("train", 15) == first[:15]
    assert task.examples("test", 10) != task.examples("validation", 10)


def test_examples_are_identical_across_processes_with_other_hash_seeds():
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT], env=env, check=True,
                         capture_output=True, text=True, cwd=Path(__file__).parent)
    assert out.stdout.strip() == _digest_here()


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_disjoint_by_input_and_counts_are_exact(name):
    task = get_task(name)
    sets = {}
    for split, n in (("train", 300), ("validation", 60), ("test", 100)):
        examples = task.examples(split, n)
        assert len(examples) == n
        inputs = [ex.input for ex in examples]
        assert len(set(inputs)) == n, "inputs repeat within a split"
        assert all(split_of(x) == split for x in inputs)
        sets[split] = set(inputs)
    assert not sets["train"] & sets["test"]
    assert not sets["train"] & sets["validation"]
    assert not sets["validation"] & sets["test"]
    assert task.examples("test", 0) == []


@pytest.mark.parametrize("name", list(TASKS))
def test_examples_are_consistent(name):
    task = get_task(name)
    examples = task.examples("validation", 50)
    used = set()
    for ex in examples:
        assert ex.task == name
        assert ex.answer == task.solve(ex.input)
        assert task.score(ex.answer, ex.answer) == 1.0
        matches = [i for i in range(len(task.templates)) if task.prompt(ex.input, i) == ex.prompt]
        assert matches, f"prompt {ex.prompt!r} is no paraphrase of the task"
        used.update(matches)
        assert len(ex.input.split()) <= 25 and ex.answer.strip() == ex.answer and ex.answer
    assert len(used) >= 2, "the paraphrase is not varied"


def test_small_input_spaces_run_out_on_eval_splits_but_not_on_train():
    task = get_task("number_to_words")  # 1000 inputs, about 200 of them in test
    with pytest.raises(ValueError, match="distinct test inputs"):
        task.examples("test", 500)
    train = task.examples("train", 1500)
    assert len(train) == 1500
    assert len({ex.input for ex in train}) < 1000
    assert all(split_of(ex.input) == "train" for ex in train)


def test_bad_split_and_count_raise():
    task = get_task("date_iso")
    with pytest.raises(ValueError, match="valid: train, validation, test"):
        task.examples("dev", 3)
    with pytest.raises(ValueError, match="n must be"):
        task.examples("train", -1)


# -- the suite as a whole ----------------------------------------------------------------------

def test_suite_shape_and_descriptions():
    assert len(HELD_IN) >= 10 and 3 <= len(HELD_OUT) <= 4
    assert set(HELD_IN) | set(HELD_OUT) == set(TASKS) and not set(HELD_IN) & set(HELD_OUT)
    descriptions = [task.description for task in TASKS.values()]
    assert len(set(descriptions)) == len(descriptions)
    for name, task in TASKS.items():
        assert task.name == name and len(task.templates) >= 3
        assert len(task.description.split()) >= 6
        assert task.held_out == (name in HELD_OUT)
    for name in HELD_OUT:
        assert TASKS[name].related and set(TASKS[name].related) <= set(HELD_IN)


def test_get_task_lists_valid_names():
    assert get_task("date_iso") is TASKS["date_iso"]
    with pytest.raises(ValueError, match="unknown task 'nope'.*date_iso.*kg_to_g"):
        get_task("nope")


def test_task_validates_its_definition():
    def sample(rng):
        return "x"
    with pytest.raises(ValueError, match="3 distinct templates"):
        Task("t", "A task.", ("{input}", "Q: {input}"), sample, str)
    with pytest.raises(ValueError, match="once"):
        Task("t", "A task.", ("{input}", "Q: {input}", "no slot"), sample, str)
    with pytest.raises(ValueError, match="lowercase"):
        Task("Bad Name", "A task.", ("{input}", "Q: {input}", "A: {input}"), sample, str)


# -- known answers (literal expectations) ------------------------------------------------------

KNOWN = {
    "date_iso": [("March 5, 2021", "2021-03-05"), ("December 31, 1999", "1999-12-31"),
                 ("February 29, 2024", "2024-02-29")],
    "date_us": [("March 5, 2021", "03/05/2021"), ("October 12, 1987", "10/12/1987")],
    "km_to_m": [("3 km", "3000 m"), ("42 km", "42000 m"), ("9999 km", "9999000 m")],
    "kg_to_g": [("7 kg", "7000 g"), ("125 kg", "125000 g")],
    "uppercase": [("green apple", "GREEN APPLE"), ("quiet morning river", "QUIET MORNING RIVER")],
    "lowercase": [("GREEN APPLE", "green apple"), ("COLD WINTER NIGHT", "cold winter night")],
    "sentiment": [("I found the movie wonderful.", "positive"),
                  ("The critic said the hotel was terrible.", "negative"),
                  ("We thought the trip was really boring.", "negative")],
    "topic": [("Ana talked about the marathon all evening.", "sports"),
              ("Yesterday Ben read an article about the pasta.", "food"),
              ("Grace asked me a question about the database.", "tech"),
              ("Have you heard what Hugo said about the passport?", "travel"),
              ("Liam could not stop thinking about the violin.", "music")],
    "extract_email": [("Please contact Ana at ana.silva@example.com for more details.",
                       "ana.silva@example.com"),
                      ("Send the report to bchen@post.co.uk before Friday.", "bchen@post.co.uk")],
    "extract_phone": [("Please call Ana at 415-555-0134 for more details.", "415-555-0134"),
                      ("Text 212-300-0042 before Friday to confirm.", "212-300-0042")],
    "number_to_words": [("0", "zero"), ("13", "thirteen"), ("42", "forty-two"), ("90", "ninety"),
                        ("100", "one hundred"), ("305", "three hundred five"),
                        ("999", "nine hundred ninety-nine")],
    "json_lookup": [('{"name": "Ana", "age": 31} age', "31"),
                    ('{"city": "Oslo", "pet": "cat", "score": 7} city', "Oslo")],
    "sort_numbers": [("42 7 19", "7 19 42"), ("5 99 0 23", "0 5 23 99")],
    "time_12h": [("14:30", "2:30 PM"), ("00:05", "12:05 AM"), ("12:00", "12:00 PM"),
                 ("09:41", "9:41 AM"), ("23:59", "11:59 PM")],
    "pluralize": [("red box", "red boxes"), ("small city", "small cities"),
                  ("old key", "old keys"), ("big dish", "big dishes"),
                  ("happy cat", "happy cats"), ("wooden bench", "wooden benches")],
    "snake_case": [("user account id", "user_account_id"), ("max retry", "max_retry")],
}


def test_every_task_has_known_cases():
    assert set(KNOWN) == set(TASKS)


@pytest.mark.parametrize("name,text,answer",
                         [(name, text, answer) for name, cases in KNOWN.items()
                          for text, answer in cases])
def test_known_answers(name, text, answer):
    task = get_task(name)
    assert task.solve(text) == answer
    assert task.score(answer, task.solve(text)) == 1.0


def test_generated_inputs_look_like_the_known_cases():
    assert all(ex.input.endswith(" km") for ex in get_task("km_to_m").examples("train", 20))
    dates = get_task("date_iso").examples("train", 200)
    assert all(ex.answer[:4].isdigit() and len(ex.answer) == 10 for ex in dates)
    labels = {ex.answer for ex in get_task("topic").examples("train", 200)}
    assert labels == {"sports", "food", "tech", "travel", "music"}
    assert {ex.answer for ex in get_task("sentiment").examples("train", 100)} == {"positive",
                                                                                  "negative"}


def test_solvers_reject_inputs_of_another_task():
    with pytest.raises(ValueError):
        get_task("date_iso").solve("14:30")
    with pytest.raises(ValueError):
        get_task("km_to_m").solve("3 kg")
    with pytest.raises(ValueError, match="exactly one"):
        get_task("sentiment").solve("The movie was great but the meal was awful.")


# -- metrics -------------------------------------------------------------------------------

def test_normalize_keeps_the_first_line_and_drops_one_trailing_period():
    assert normalize("  2021-03-05  ") == "2021-03-05"
    assert normalize("\n 2:30   PM.\nThe time is 2:30 in the afternoon.") == "2:30 PM"
    assert normalize("forty-two..") == "forty-two."
    assert normalize("") == "" and normalize(" \n ") == ""


def test_exact_match():
    assert exact_match("2021-03-05", "2021-03-05") == 1.0
    assert exact_match("2021-03-05.\nI converted the date for you.", "2021-03-05") == 1.0
    assert exact_match("2021-03-06", "2021-03-05") == 0.0
    assert exact_match("The date is 2021-03-05", "2021-03-05") == 0.0
    assert exact_match("green apple", "GREEN APPLE") == 0.0  # case-sensitive
    assert exact_match("\n", "31") == 0.0


def test_classification_tasks_ignore_case():
    assert exact_match_ci("Positive.", "positive") == 1.0
    assert get_task("sentiment").score("NEGATIVE\nbecause of 'terrible'", "negative") == 1.0
    assert get_task("topic").score("sport", "sports") == 0.0
    assert get_task("uppercase").score("green apple", "GREEN APPLE") == 0.0


# -- JSONL -----------------------------------------------------------------------------------

def test_jsonl_round_trip(tmp_path):
    examples = get_task("json_lookup").examples("test", 5) + get_task("date_us").examples("test", 3)
    path = tmp_path / "sub" / "data.jsonl"
    assert write_jsonl(path, examples) == 8
    records = read_jsonl(path)
    assert [Example(**r) for r in records] == examples
    assert {"prompt", "answer", "task", "input"} <= set(records[0])


def test_jsonl_accepts_dicts_extra_keys_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "answer": "a", "task": "t", "weight": 2}\n\n'
                    '{"prompt": "q", "answer": "b"}\n')
    assert read_jsonl(path) == [{"prompt": "p", "answer": "a", "task": "t", "weight": 2},
                                {"prompt": "q", "answer": "b"}]
    assert write_jsonl(tmp_path / "e.jsonl", read_jsonl(path)) == 2


@pytest.mark.parametrize("bad,message", [
    ('{"prompt": "p", "answer": ', "line 2: malformed JSON"),
    ('{"prompt": "p", "task": "t"}', "line 2: missing key.*answer"),
    ('["p", "a"]', "line 2: expected a JSON object"),
    ('{"prompt": "p", "answer": 3}', "line 2: 'answer' must be a string"),
])
def test_read_jsonl_names_the_bad_line(tmp_path, bad, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "answer": "ok"}\n' + bad + "\n")
    with pytest.raises(ValueError, match=message):
        read_jsonl(path)


def test_write_jsonl_rejects_records_without_prompt(tmp_path):
    with pytest.raises(ValueError, match="prompt"):
        write_jsonl(tmp_path / "x.jsonl", [{"answer": "a"}])


def test_export_writes_every_task_in_order(tmp_path):
    path = tmp_path / "train.jsonl"
    assert export(["km_to_m", "topic"], "train", 4, path) == 8
    records = read_jsonl(path)
    assert [r["task"] for r in records] == ["km_to_m"] * 4 + ["topic"] * 4
    assert [r["prompt"] for r in records[:4]] == [e.prompt for e in
                                                  get_task("km_to_m").examples("train", 4)]
    assert export("date_us", "test", 2, tmp_path / "one.jsonl") == 2
    with pytest.raises(ValueError, match="unknown task"):
        export(["km_to_m", "nope"], "train", 1, tmp_path / "never.jsonl")
    assert not (tmp_path / "never.jsonl").exists()
