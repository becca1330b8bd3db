"""Careless and hostile input at the command line: nothing a user types destroys data or gives a
silently wrong model, and every error is one clear line (exit code 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quiver import cli
from quiver.cli import app


def run(*argv) -> tuple[int, str, str]:
    """``quiver ARGV`` through ``cli.main`` (the real entry point): (exit code, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["quiver", *map(str, argv)]
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()


def error_line(err: str) -> str:
    """The single error line (asserting there is exactly one and no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture
def tiny_lib(tmp_path, tiny_model_dir, peft_adapter_dir):
    """Factory: a library on the tiny model at ``path`` holding adapters ``names``."""
    from quiver.library import BaseModelSpec, Library, load_base_model

    model, _ = load_base_model(tiny_model_dir, tokenizer=False)
    spec = BaseModelSpec.from_model(model)

    def make(path: Path, names=("a", "b")) -> Path:
        with Library.open(path, base_model=spec) as lib:
            for i, name in enumerate(names):
                lib.add_peft(peft_adapter_dir(name, seed=i + 1), name=name, description=f"adapter {name}",
                             examples=[f"example for {name}"], tags=["t"])
        return path

    return make


def tree(path: Path) -> dict[str, bytes]:
    """Every file's bytes (SQLite's -wal/-shm companions aside: opening a library may write them)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def flat(text: str) -> str:
    """Help/usage text with rich's box drawing and line wrapping removed."""
    return " ".join(text.replace("│", " ").replace("╭", " ").replace("╰", " ").replace("─", " ").split())


# -- data loss ---------------------------------------------------------------------------------------
def test_export_to_the_current_directory_is_refused_and_deletes_nothing(tmp_path, tiny_lib, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    tiny_lib(work / "lib")
    (work / "notes.txt").write_text("mine")
    before = tree(work)
    monkeypatch.chdir(work)
    code, _, err = run("library", "export", "a", ".", "--overwrite", "-L", "lib")
    assert code == 2
    assert "is the current directory" in error_line(err)
    assert tree(work) == before
    code, _, err = run("library", "export", "a", "..", "--overwrite", "-L", "lib")
    assert code == 2 and "current directory or contains it" in error_line(err)
    assert tree(work) == before


def test_export_over_the_library_or_a_file_is_refused(tmp_path, tiny_lib, monkeypatch):
    lib = tiny_lib(tmp_path / "lib")
    before = tree(lib)
    code, _, err = run("library", "export", "a", lib, "--overwrite", "-L", lib)
    assert code == 2 and "is inside the library" in error_line(err)
    code, _, err = run("library", "export", "a", tmp_path, "--overwrite", "-L", lib)  # contains the library
    assert code == 2 and "would replace" in error_line(err)
    (tmp_path / "some-file.txt").write_text("keep me")
    code, _, err = run("library", "export", "a", tmp_path / "some-file.txt", "--overwrite", "-L", lib)
    assert code == 2 and "exists and is not a directory" in error_line(err)
    assert (tmp_path / "some-file.txt").read_text() == "keep me"
    assert tree(lib) == before
    # a previous export is replaced with --overwrite (and only with it); the hint names the flag
    assert run("library", "export", "a", tmp_path / "out", "-L", lib)[0] == 0
    code, _, err = run("library", "export", "b", tmp_path / "out", "-L", lib)
    assert code == 2 and "--overwrite replaces it" in error_line(err) and "overwrite=True" not in err
    assert run("library", "export", "b", tmp_path / "out", "--overwrite", "-L", lib)[0] == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left beside


def test_merge_checkpoint_over_the_library_is_refused(tmp_path, tiny_lib, tiny_model_dir):
    lib = tiny_lib(tmp_path / "lib")
    before = tree(lib)
    code, _, err = run("merge", "-L", lib, f"model.name={tiny_model_dir}", "adapters=[a,b]", "output=checkpoint",
                       f"output.path={lib}", "output.overwrite=true")
    assert code == 2 and "is inside the library" in error_line(err)
    assert tree(lib) == before


def test_merge_output_path_dot_is_one_clear_line(tmp_path, tiny_lib, tiny_model_dir, monkeypatch):
    lib = tiny_lib(tmp_path / "lib")
    monkeypatch.chdir(tmp_path)
    code, _, err = run("merge", "-L", lib, f"model.name={tiny_model_dir}", "adapters=[a,b]", "output=checkpoint",
                       "output.path=.", "output.overwrite=true")
    assert code == 2 and "is the current directory" in error_line(err)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.name == "model.safetensors.index.json"]


def test_truncated_catalog_is_reported_and_verify_fix_keeps_the_blobs(tmp_path, tiny_lib):
    lib = tiny_lib(tmp_path / "lib")
    blobs = tree(lib / "blobs")
    assert len(blobs) == 2
    (lib / "catalog.sqlite").write_bytes(b"")
    for args in (("library", "list"), ("library", "verify", "--fix")):
        code, out, err = run(*args, "-L", lib)
        assert code == 2
        line = error_line(err)
        assert "catalog.sqlite is damaged (it is empty (0 bytes) while blobs/ holds 2 blob(s))" in line
        assert "restore catalog.sqlite from a backup" in line
    assert tree(lib / "blobs") == blobs


def test_verify_fix_never_deletes_blobs_a_fresh_catalog_does_not_know(tmp_path, tiny_lib, tiny_model_dir):
    lib = tiny_lib(tmp_path / "lib")
    blobs = tree(lib / "blobs")
    for f in lib.glob("catalog.sqlite*"):
        f.unlink()
    assert run("library", "init", "-L", lib, f"model.name={tiny_model_dir}")[0] == 0  # an empty catalog again
    code, out, err = run("library", "verify", "--fix", "-L", lib)
    assert code == 1
    assert "refused: not deleting 2 unreferenced blob(s): the catalog references no blob at all" in " ".join(err.split())
    assert tree(lib / "blobs") == blobs


def test_corrupt_catalog_is_one_line_naming_the_file(tmp_path, tiny_lib):
    lib = tiny_lib(tmp_path / "lib")
    for f in lib.glob("catalog.sqlite-*"):
        f.unlink()
    (lib / "catalog.sqlite").write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    code, _, err = run("library", "list", "-L", lib)
    assert code == 2
    line = error_line(err)
    assert f"the catalog {lib / 'catalog.sqlite'} is damaged" in line and "restore catalog.sqlite" in line


def test_merge_to_lora_checks_name_and_path_before_any_work(tmp_path, tiny_lib, tiny_model_dir, monkeypatch):
    lib = tiny_lib(tmp_path / "lib")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "data.txt").write_text("mine")
    common = ["-L", lib, f"model.name={tiny_model_dir}", "merge=linear", "adapters=[a,b]", "output=lora"]
    code, _, err = run("merge", *common, "output.name=x6", f"output.path={existing}")
    assert code == 2 and "is not empty and is not a PEFT adapter directory" in error_line(err)
    code, _, err = run("merge", *common, "output.name=x6", f"output.path={existing}", "output.overwrite=true")
    assert code == 2 and "only a previous output of the same kind is ever replaced" in error_line(err)
    assert (existing / "data.txt").read_text() == "mine"
    code, out, _ = run("library", "list", "-L", lib, "--json")
    assert [r["name"] for r in json.loads(out)] == ["a", "b"]  # x6 was not registered

    import quiver.merging

    def no_merge(*a, **k):
        raise AssertionError("the merge ran before the name was checked")

    monkeypatch.setattr(quiver.merging, "merge", no_merge)
    code, _, err = run("merge", *common, "output.name=a")
    assert code == 2 and "an adapter named 'a' already exists" in error_line(err) and "output.replace=true" in err
    monkeypatch.undo()
    # a previous export is replaced with output.overwrite=true (a plain Hydra override)
    assert run("merge", *common, "output.name=m1", f"output.path={tmp_path / 'peft'}")[0] == 0
    code, _, err = run("merge", *common, "output.name=m2", f"output.path={tmp_path / 'peft'}")
    assert code == 2 and "output.overwrite=true replaces it" in error_line(err)
    code, out, err = run("merge", *common, "output.name=m2", f"output.path={tmp_path / 'peft'}",
                         "output.overwrite=true", "--json")
    assert code == 0, err
    assert json.loads(out)["registered"] == "m2"


def test_degenerate_merges_are_refused(tmp_path, tiny_lib, tiny_model_dir):
    lib = tiny_lib(tmp_path / "lib")
    common = ["-L", lib, f"model.name={tiny_model_dir}", "merge=linear", "output=lora", "output.name=m"]
    cases = {
        "adapters=[a]": "a merge needs at least two adapters: adapters=[a,b,...] (to copy 'a', use `quiver library export`)",
        "adapters=[a,a]": "adapter(s) ['a'] listed more than once",
        "adapters=a": "adapters must be a list: adapters=[a,b], got adapters=a",
        "adapters=a,b": "adapters=a,b: a list is written adapters=[a,b]",
    }
    for arg, message in cases.items():
        code, _, err = run("merge", *common, arg)
        assert code == 2 and message in error_line(err), (arg, err)
    code, _, err = run("merge", *common, "adapters=[a,b]", "weights=[0,0]")
    assert code == 2 and "weights are all zero" in error_line(err)
    code, out, _ = run("library", "list", "-L", lib, "--json")
    assert [r["name"] for r in json.loads(out)] == ["a", "b"]


# -- silently wrong results ------------------------------------------------------------------------------
def test_a_merged_checkpoint_has_its_own_fingerprint(tmp_path, tiny_lib, tiny_model_dir):
    from quiver.library import fingerprint, load_base_model

    FINGERPRINT_FILE = "quiver-fingerprint.json"  # noqa: N806 -- the record beside a model's weights

    lib = tiny_lib(tmp_path / "lib")
    base_dir = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base_dir)
    base, _ = load_base_model(base_dir, tokenizer=False)
    base_fp = fingerprint(base)
    # a base directory with a fingerprint record, as the model cache has
    (base_dir / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": base_fp}))
    ckpt = tmp_path / "merged"
    code, _, err = run("merge", "-L", lib, f"model.name={base_dir}", "merge=linear", "adapters=[a,b]",
                       "output=checkpoint", f"output.path={ckpt}")
    assert code == 0, err
    assert not (ckpt / FINGERPRINT_FILE).exists()
    merged, _ = load_base_model(ckpt, tokenizer=False)
    assert fingerprint(merged) != base_fp
    # a stale record copied beside other weights (what older versions wrote) is not trusted
    (ckpt / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": base_fp}))
    again, _ = load_base_model(ckpt, tokenizer=False)
    assert fingerprint(again) == fingerprint(merged) != base_fp
    # so the base's library refuses to route over the merged model, in one line
    code, _, err = run("generate", "-L", lib, f"model.name={ckpt}", "--prompt", "hi", "generate.max_new_tokens=2",
                       "generate.chat_template=false")
    assert code == 2 and "differs from the library's base model" in error_line(err)


def test_replace_keeps_description_examples_and_tags(tmp_path, tiny_lib, peft_adapter_dir):
    lib = tiny_lib(tmp_path / "lib")
    code, _, err = run("library", "add", peft_adapter_dir("a2", seed=9), "--name", "a", "--replace", "-L", lib)
    assert code == 0, err
    code, out, _ = run("library", "show", "a", "-L", lib, "--json")
    rec = json.loads(out)
    assert (rec["description"], rec["examples"], rec["tags"], rec["version"]) == (
        "adapter a", ["example for a"], ["t"], 2)
    code, _, _ = run("library", "add", peft_adapter_dir("a3", seed=8), "--name", "a", "--replace",
                     "--description", "new words", "-L", lib)
    rec = json.loads(run("library", "show", "a", "-L", lib, "--json")[1])
    assert (rec["description"], rec["tags"], rec["version"]) == ("new words", ["t"], 3)


def test_trace_colours_are_distinct_and_tokens_are_text(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from quiver.runtime.answer import token_texts
    from quiver.runtime.trace import adapter_colors

    for n in (1, 12, 20, 21, 40, 64):
        colours = adapter_colors(n)
        assert len(set(colours)) == n
        dist = min(sum((a - b) ** 2 for a, b in zip(c1, c2)) ** 0.5
                   for i, c1 in enumerate(colours) for c2 in colours[i + 1:]) if n > 1 else 1
        assert dist > (0.1 if n <= 21 else 0.02), (n, dist)
    # byte-level BPE (GPT-2 / SmolLM style): labels are the text, not "Ġ" / "Ċ"
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["hello the world\nthe end"] * 10,
                           trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                               show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    ids = tok("hello the world\nthe")["input_ids"]
    assert any("Ġ" in t or "Ċ" in t for t in tok.convert_ids_to_tokens(ids))
    texts = token_texts(tok, ids)
    assert "".join(texts) == "hello the world\nthe" and not any("Ġ" in t or "Ċ" in t for t in texts)


def test_heatmap_gives_each_shown_adapter_its_own_colour(tmp_path):
    import matplotlib.image as mpimg
    import torch

    from quiver.routing import RoutingDecision
    from quiver.runtime.trace import Trace, adapter_colors

    n = 25  # more adapters than a 20-colour map has
    tr = Trace()
    keys = [f"ad{i:02d}" for i in range(n)]
    idx = torch.arange(n).view(n, 1)  # token t routes to adapter t in every layer
    for layer in range(2):
        tr.record(f"model.layers.{layer}.self_attn.q_proj", (1, n), RoutingDecision(idx, torch.ones(n, 1)), keys)
    png = tmp_path / "t.png"
    tr.heatmap(png, tokens=[f"tok{i}" for i in range(n)])
    names, layers, top = tr.top_adapters()
    assert top[:, 0].tolist() == list(range(n))
    img = mpimg.imread(png)[..., :3]
    want = adapter_colors(n)
    found = {tuple(round(float(c), 1) for c in rgb) for rgb in img.reshape(-1, 3)}
    assert sum(tuple(round(c, 1) for c in colour) in found for colour in want) >= n - 1


# -- one clear line --------------------------------------------------------------------------------
def _immutable(path: Path, on: bool) -> bool:
    """Make a directory unwritable even for root (chattr) or by permissions; False if impossible."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555 if on else 0o755)
        return True
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True).returncode == 0


def test_read_only_library_reads_and_refuses_writes_in_one_line(tmp_path, tiny_lib, peft_adapter_dir):
    lib = tiny_lib(tmp_path / "lib")
    extra = peft_adapter_dir("c", seed=5)
    if not _immutable(lib, True):
        pytest.skip("cannot make a directory read-only here")
    try:
        code, out, err = run("library", "list", "-L", lib, "--json")
        assert code == 0, err
        assert [r["name"] for r in json.loads(out)] == ["a", "b"]
        code, out, err = run("library", "show", "a", "-L", lib)
        assert code == 0, err
        code, _, err = run("library", "add", extra, "--name", "c", "-L", lib)
        assert code == 2 and f"library {lib} is read-only" in error_line(err)
        code, _, err = run("library", "remove", "a", "-L", lib)
        assert code == 2 and "is read-only" in error_line(err)
    finally:
        _immutable(lib, False)


def test_bad_overrides_and_inputs_are_one_line(tmp_path, tiny_lib, tiny_model_dir):
    lib = tiny_lib(tmp_path / "lib")
    gen = ["generate", "-L", lib, f"model.name={tiny_model_dir}", "generate.chat_template=false",
           "generate.max_new_tokens=2"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cases = [
        ((*gen, "--prompt", ""), "--prompt number 1 is empty"),
        ((*gen, "--prompt", "hi", "generate.capacity=1"),
         "generate.capacity=1 is below the 2 adapters one step of this router may need at once"),
        ((*gen, "--prompt", "hi", "generate.capacity=0"), "generate.capacity must be null (all adapters) or an integer >= 1"),
        ((*gen, "--prompt", "hi", "generate.backend=triton"), "generate.backend=triton runs on a CUDA device"),
        ((*gen, "--prompt", "hi", "generate.backend=fast"), "unknown generate.backend 'fast'"),
        ((*gen, "--prompt", "hi", "generate.max_new_tokens=abc"),
         "generate.max_new_tokens must be an integer, got generate.max_new_tokens='abc'"),
        ((*gen, "--prompt", "hi", "generate.max_new_tokens=0"), "generate.max_new_tokens must be at least 1"),
        (("library", "embed", "-L", lib, "library.embed.svd_dims=abc"), "library.embed.svd_dims must be an integer"),
        ((*gen, "--file", empty), f"{empty} holds no prompts"),
        ((*gen, "--prompt", "hi", "--trace", tmp_path / "nodir" / "t.png"), "the folder"),
        (("library", "search", "  ", "-L", lib), "empty search query"),
    ]
    for argv, message in cases:
        code, _, err = run(*argv)
        assert code == 2 and message in error_line(err), (argv, err)


def test_trace_path_is_checked_before_generation(tmp_path, tiny_lib, tiny_model_dir, monkeypatch):
    import quiver.library

    lib = tiny_lib(tmp_path / "lib")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the trace path was checked")

    monkeypatch.setattr(quiver.library, "load_base_model", no_load)
    code, _, err = run("generate", "-L", lib, f"model.name={tiny_model_dir}", "--prompt", "hi",
                       "--trace", tmp_path / "nodir" / "t.png")
    assert code == 2
    assert f"cannot write {str(tmp_path / 'nodir' / 't.png')!r}: the folder" in error_line(err)


def test_unbound_library_and_open_typo(tmp_path, peft_adapter_dir):
    from quiver import Library

    with pytest.raises(FileNotFoundError, match="no library at"):
        Library.open(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()
    Library.open(tmp_path / "bare", create=True).close()
    code, _, err = run("library", "add", peft_adapter_dir("a"), "--name", "a", "-L", tmp_path / "bare")
    assert code == 2 and f"`quiver library init -L {tmp_path / 'bare'}`" in error_line(err)


def test_k_zero_is_refused_not_defaulted(tmp_path, tiny_lib):
    lib = tiny_lib(tmp_path / "lib")
    r = CliRunner().invoke(app, ["library", "similar", "a", "-k", "0", "-L", str(lib)])
    assert r.exit_code == 2 and "Invalid value for '-k': Input should be greater than or equal to 1" in flat(r.output)


def test_peft_config_mismatches_warn(tmp_path, tiny_lib, peft_adapter_dir):
    lib = tiny_lib(tmp_path / "lib")
    src = peft_adapter_dir("w", seed=3)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj", "k_proj"]
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    code, out, err = run("library", "add", src, "--name", "w", "-L", lib)
    assert code == 0, err
    assert "lists target module(s) ['k_proj'] but adapter_model.safetensors has no tensors for them" in err
    assert "says it was trained on 'meta-llama/Llama-3.2-1B'" in err
    assert all(ln.startswith("warning: ") for ln in err.splitlines() if ln.strip())


# -- friction ----------------------------------------------------------------------------------------
def test_generate_file_is_batched_with_progress_and_short_echo(tmp_path, tiny_lib, tiny_model_dir, monkeypatch):
    import quiver.runtime

    lib = tiny_lib(tmp_path / "lib")
    prompts = [f"what is {i} plus {i}" for i in range(5)] + ["convert the date " * 15]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    sizes = []
    real = quiver.runtime.answer

    def counting(rm, tok, batch, **kw):
        sizes.append(len(batch))
        return real(rm, tok, batch, **kw)

    monkeypatch.setattr(quiver.runtime, "answer", counting)
    code, out, err = run("generate", "-L", lib, f"model.name={tiny_model_dir}", "--file", f, "--trace",
                         tmp_path / "tr.png", "generate.chat_template=false", "generate.max_new_tokens=2",
                         "generate.batch_size=4")
    assert code == 0, err
    assert sizes == [4, 2]
    assert "generating" in err and "6/6" in err  # the progress bar
    assert f"… ({len(prompts[-1]):,} characters)" in out and prompts[-1] not in out
    assert sorted(p.name for p in tmp_path.glob("tr-*.png")) == [f"tr-{i}.png" for i in range(6)]


def test_show_merge_embed_print_tables(tmp_path, tiny_lib, tiny_model_dir):
    lib = tiny_lib(tmp_path / "lib")
    code, out, _ = run("library", "show", "a", "-L", lib)
    assert code == 0 and "{'" not in out and "created_at" in out
    import re

    assert re.search(r"created_at\s+│?\s*\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", out), out
    code, out, _ = run("library", "embed", "-L", lib, "--kind", "svd")
    assert code == 0 and "{'" not in out and re.search(r"svd\s+│?\s*2", out), out
    code, out, err = run("merge", "-L", lib, f"model.name={tiny_model_dir}", "merge=linear", "adapters=[a,b]",
                         "output=lora", "output.name=ab")
    assert code == 0, err
    assert "{'" not in out and re.search(r"registered\s+│?\s*ab", out), out


def test_search_says_what_it_is_doing_and_refuses_empty_queries(tmp_path, tiny_lib):
    from quiver import Library

    lib = tiny_lib(tmp_path / "lib")
    code, out, err = run("library", "search", "adapter a", "-L", lib, "--json", "-k", "1")
    assert code == 0, err
    assert json.loads(out)[0]["name"] == "a"
    assert "search: loading the text encoder (all-MiniLM-L6-v2" in err
    with Library.open(lib) as opened, pytest.raises(ValueError, match="empty search query"):
        opened.search("   ")  # not a score of 1.0 for every adapter


def test_help_documents_keys_and_options():
    runner = CliRunner()
    out = flat(runner.invoke(app, ["library", "search", "--help"]).output)
    assert "How many adapters to return (default: library.search.k, 3)" in out
    out = flat(runner.invoke(app, ["generate", "--help"]).output)
    import yaml

    keys = yaml.safe_load((Path(cli.__file__).parent / "conf" / "generate" / "default.yaml").read_text())
    assert all(k in out for k in keys), [k for k in keys if k not in out]
    out = flat(runner.invoke(app, ["merge", "--help"]).output)
    for key in ("weights=", "output.path", "output.replace", "output.overwrite", "adapters="):
        assert key in out, key


def test_outputs_follow_the_umask(tmp_path, tiny_lib, tiny_model_dir):
    lib = tiny_lib(tmp_path / "lib")
    old = os.umask(0o022)
    try:
        assert run("library", "export", "a", tmp_path / "out", "-L", lib)[0] == 0
        assert run("merge", "-L", lib, f"model.name={tiny_model_dir}", "merge=linear", "adapters=[a,b]",
                   "output=checkpoint", f"output.path={tmp_path / 'ckpt'}")[0] == 0
    finally:
        os.umask(old)
    for d in (tmp_path / "out", tmp_path / "ckpt"):
        assert d.stat().st_mode & 0o777 == 0o755, d
        for f in d.iterdir():
            assert f.stat().st_mode & 0o777 == 0o644, f


def test_verify_fix_removes_parts_of_dead_writers(tmp_path, tiny_lib):
    lib = tiny_lib(tmp_path / "lib")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (lib / "tmp" / f"{dead.pid}-1.part").write_bytes(b"")
    (lib / "tmp" / f"{os.getpid()}-2.part").write_bytes(b"")  # a live writer (this process): kept
    code, _, err = run("library", "verify", "--fix", "-L", lib)
    assert code == 0, err
    assert [p.name for p in (lib / "tmp").iterdir()] == [f"{os.getpid()}-2.part"]


def test_python_merge_warns_on_degenerate_inputs(tmp_path, tiny_lib):
    from quiver import Library
    from quiver.merging import merge

    with Library.open(tiny_lib(tmp_path / "lib")) as lib:
        a, b = lib.get("a"), lib.get("b")
    with pytest.warns(UserWarning, match=r"merging a single source \('a'\)"):
        merge([a], method="linear")
    with pytest.warns(UserWarning, match=r"source\(s\) \['a'\] given more than once"):
        merge([a, a, b], method="linear")
    with pytest.raises(ValueError, match="weights are all zero"):
        merge([a, b], method="linear", weights=[0, 0])
