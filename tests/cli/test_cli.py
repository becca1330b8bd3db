"""The `quiver library` CLI end to end on the tiny model (conf/ itself: tests/test_config.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quiver.cli import app

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture
def runner():
    return CliRunner()


def invoke(runner, *args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=True)
    return result


def test_library_cli_end_to_end(runner, tmp_path, tiny_model_dir, peft_adapter_dir):
    lib = tmp_path / "lib"
    r = invoke(runner, "library", "init", "--library", lib, f"model.name={tiny_model_dir}")
    assert r.exit_code == 0, r.output
    r = invoke(runner, "library", "add", peft_adapter_dir("a", seed=1), "--name", "sql", "--library", lib,
               "--description", "Write SQL queries for questions about a database", "--tag", "db")
    assert r.exit_code == 0 and "added sql" in r.output, r.output
    invoke(runner, "library", "add", peft_adapter_dir("b", seed=2), "--name", "fr", "-L", lib,
           "--description", "Translate English to French")
    r = invoke(runner, "library", "list", "-L", lib, "--json")
    assert [x["name"] for x in json.loads(r.stdout)] == ["fr", "sql"]
    r = invoke(runner, "library", "search", "SELECT rows from the table", "-L", lib, "--json", "-k", "1")
    assert json.loads(r.stdout)[0]["name"] == "sql"
    r = invoke(runner, "library", "similar", "sql", "-L", lib, "--json")
    assert [x["name"] for x in json.loads(r.stdout)] == ["fr"]
    r = invoke(runner, "library", "rename", "fr", "french", "-L", lib)
    assert r.exit_code == 0
    r = invoke(runner, "library", "tag", "french", "lang", "-L", lib)
    assert "['lang']" in r.output
    r = invoke(runner, "library", "export", "french", tmp_path / "out", "-L", lib)
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    r = invoke(runner, "library", "verify", "-L", lib, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True
    r = invoke(runner, "library", "cluster", "-L", lib, "-k", "2")
    assert sorted(sum(json.loads(r.stdout)["clusters"].values(), [])) == ["french", "sql"]
    r = invoke(runner, "library", "remove", "sql", "-L", lib)
    assert r.exit_code == 0
    r = invoke(runner, "library", "show", "sql", "-L", lib)
    assert r.exit_code != 0 and "no adapter named 'sql'" in str(r.exception)


def test_cli_rejects_stray_arguments_and_missing_library(runner, tmp_path):
    r = invoke(runner, "library", "list", "-L", tmp_path / "nope")
    assert r.exit_code != 0 and "no library at" in str(r.exception)
    assert not (tmp_path / "nope").exists()  # reading commands never create a library
    r = invoke(runner, "library", "search", "q", "-L", tmp_path, "bogus")
    assert r.exit_code == 2 and "unexpected argument(s) ['bogus']" in r.output


def test_main_prints_a_clean_error(tmp_path, capsys, monkeypatch):
    from quiver import cli

    monkeypatch.setattr("sys.argv", ["quiver", "library", "list", "-L", str(tmp_path / "none")])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: no library at")


def test_generate_cli_with_router_overrides_and_trace(runner, tmp_path, tiny_model_dir, peft_adapter_dir):
    lib = tmp_path / "lib"
    assert invoke(runner, "library", "init", "-L", lib, f"model.name={tiny_model_dir}").exit_code == 0
    for i, name in enumerate(["sql", "fr", "dates"]):
        invoke(runner, "library", "add", peft_adapter_dir(name, seed=i), "--name", name, "-L", lib)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "what is two plus two"}\n"convert the date"\n')
    common = ["-L", lib, f"model.name={tiny_model_dir}", "generate.chat_template=false", "generate.max_new_tokens=4"]
    r = invoke(runner, "generate", "--file", prompts, "--trace", tmp_path / "tr.png", "--json", *common,
               "router=arrow", "router.top_k=2")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [o["prompt"] for o in out] == ["what is two plus two", "convert the date"]
    assert all(abs(sum(o["adapters"].values()) - 1) < 1e-6 and len(o["adapters"]) >= 2 for o in out)
    assert (tmp_path / "tr-0.png").is_file() and (tmp_path / "tr-1.json").is_file()
    r = invoke(runner, "generate", "--prompt", "hi", "--json", *common, "router=single", "router.adapter=fr")
    assert json.loads(r.stdout)[0]["adapters"] == {"fr": 1.0}
    r = invoke(runner, "generate", "--json", *common)
    assert r.exit_code != 0 and "give at least one --prompt" in str(r.exception)


def test_merge_cli_to_lora_and_checkpoint(runner, tmp_path, tiny_model_dir, peft_adapter_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from quiver import Library

    lib = tmp_path / "lib"
    invoke(runner, "library", "init", "-L", lib, f"model.name={tiny_model_dir}")
    for i, name in enumerate(["a", "b"]):
        invoke(runner, "library", "add", peft_adapter_dir(name, seed=i), "--name", name, "-L", lib)
    r = invoke(runner, "merge", "-L", lib, "--json", f"model.name={tiny_model_dir}", "merge=linear",
               "adapters=[a,b]", "weights=[0.5,0.5]", "output=lora", "output.name=ab", f"output.path={tmp_path / 'ab'}")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["registered"] == "ab" and out["min_retained_energy"] > 0.999  # exact concatenation
    with Library.open(lib) as opened:
        merged, a, b = opened.get("ab"), opened.get("a"), opened.get("b")
        path = next(iter(a.modules))
        torch.testing.assert_close(merged.delta(path), 0.5 * a.delta(path) + 0.5 * b.delta(path), atol=1e-6, rtol=1e-5)
    assert (tmp_path / "ab" / "adapter_config.json").is_file()
    r = invoke(runner, "merge", "-L", lib, f"model.name={tiny_model_dir}", "merge=ties", "merge.density=0.5",
               "adapters=[a,b]", "output=checkpoint", f"output.path={tmp_path / 'ckpt'}")
    assert r.exit_code == 0, r.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert model.config.hidden_size == 32
    r = invoke(runner, "merge", "-L", lib, f"model.name={tiny_model_dir}", "merge=ties", "adapters=[a,b]",
               "output=checkpoint", f"output.path={tmp_path / 'ckpt'}")
    assert r.exit_code != 0 and "not empty" in str(r.exception)
    r = invoke(runner, "merge", "-L", lib, "merge=nope", "adapters=[a]")
    assert r.exit_code != 0
