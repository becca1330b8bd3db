"""What every command shares: bad overrides and inputs are one line, results print as tables,
`--help` documents the keys."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cli_helpers import error_line, flat, run
from quiver import cli
from quiver.cli import app


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

def test_help_documents_keys_and_options():
    runner = CliRunner()
    out = flat(runner.invoke(app, ["library", "search", "--help"]).output)
    assert "How many adapters to return (default: library.search.k, 3)" in out
    out = flat(runner.invoke(app, ["generate", "--help"]).output)
    import yaml

    keys = yaml.safe_load((Path(cli.__file__).parents[1] / "conf" / "generate" / "default.yaml").read_text())
    assert all(k in out for k in keys), [k for k in keys if k not in out]
    out = flat(runner.invoke(app, ["merge", "--help"]).output)
    for key in ("weights=", "output.path", "output.replace", "output.overwrite", "adapters="):
        assert key in out, key
