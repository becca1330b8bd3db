"""`quiver library ...` with careless and hostile input: exports never overwrite data, a damaged
catalog keeps the blobs, a read-only library reads; every error is one clear line (exit code 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli_helpers import error_line, flat, run, tree
from quiver.cli import app


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

def test_search_says_what_it_is_doing_and_refuses_empty_queries(tmp_path, tiny_lib):
    from quiver import Library

    lib = tiny_lib(tmp_path / "lib")
    code, out, err = run("library", "search", "adapter a", "-L", lib, "--json", "-k", "1")
    assert code == 0, err
    assert json.loads(out)[0]["name"] == "a"
    assert "search: loading the text encoder (all-MiniLM-L6-v2" in err
    with Library.open(lib) as opened, pytest.raises(ValueError, match="empty search query"):
        opened.search("   ")  # not a score of 1.0 for every adapter

def test_verify_fix_removes_parts_of_dead_writers(tmp_path, tiny_lib):
    lib = tiny_lib(tmp_path / "lib")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (lib / "tmp" / f"{dead.pid}-1.part").write_bytes(b"")
    (lib / "tmp" / f"{os.getpid()}-2.part").write_bytes(b"")  # a live writer (this process): kept
    code, _, err = run("library", "verify", "--fix", "-L", lib)
    assert code == 0, err
    assert [p.name for p in (lib / "tmp").iterdir()] == [f"{os.getpid()}-2.part"]


def test_tag_takes_key_value_overrides_like_every_command(tmp_path, tiny_lib):
    lib = tiny_lib(tmp_path / "lib")
    code, out, err = run("library", "tag", "a", "x", "y", f"library.path={lib}")  # the library from the override
    assert code == 0 and "'x', 'y'" in out, err
    code, out, err = run("library", "tag", "a", "x", "--remove", f"library.path={lib}")
    assert code == 0 and "['t', 'y']" in out, err
    code, _, err = run("library", "tag", "a", "-L", lib, "library.search.k=abc")
    assert code == 2 and "give at least one tag" in error_line(err)
    code, _, err = run("library", "tag", "a", "z", "-L", lib, "library.search.k=abc")
    assert code == 2 and "library.search.k must be an integer" in error_line(err)
