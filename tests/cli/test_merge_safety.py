"""`quiver merge` with careless and hostile input: output paths and names are checked before any
work, degenerate merges are refused, a merged checkpoint is a new model."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from cli_helpers import error_line, run, tree


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
