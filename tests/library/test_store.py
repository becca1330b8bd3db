"""Catalog + blob store: round trips, metadata operations, bad input leaves the library as it was."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from quiver.library import (
    AdapterNotFoundError,
    BaseModelRef,
    CorruptBlobError,
    DuplicateNameError,
    Library,
    ValidationError,
)
from quiver.library.synthetic import random_adapter


def snapshot(library: Library) -> tuple:
    """Everything a failed operation must leave unchanged: rows, blobs, generation."""
    rows = [r.to_dict() for r in library.list()]
    blobs = sorted(b.digest for b in library._blobs.list())
    return json.dumps(rows, sort_keys=True), blobs, library.generation


def reopen(library: Library, **kwargs) -> Library:
    """The same library opened again (a team library: from the same machine's cache)."""
    if library._blobs.is_local:
        return Library.open(library.path, **kwargs)
    return library._test_target.open(**kwargs)


def test_add_get_roundtrip_is_exact_and_content_addressed(lib, raw, tiny_spec):
    ad = random_adapter(tiny_spec, "sql", rank=4, seed=1)
    rec = lib.add(ad, description="turn questions into SQL", examples=["list users"], tags=["db"])
    got = lib.get("sql")
    assert set(got.modules) == set(ad.modules)
    for path, m in ad.modules.items():
        assert torch.equal(got.modules[path].A, m.A) and torch.equal(got.modules[path].B, m.B)
    assert hashlib.sha256(raw.read(rec.blob)).hexdigest() == rec.blob == ad.content_hash()
    assert (rec.rank, rec.description, rec.examples, rec.tags) == (4, "turn questions into SQL", ["list users"], ["db"])
    assert rec.target_modules == sorted({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


def test_catalog_is_wal_and_persists_across_opens(lib, tiny_spec, backend):
    lib.add(random_adapter(tiny_spec, "a", seed=1))
    if backend == "local":
        assert lib._catalog.connection.execute("PRAGMA journal_mode").fetchone()["journal_mode"] == "wal"
    with reopen(lib) as again:
        assert again.names() == ["a"] and again.base.fingerprint == tiny_spec.fingerprint


def test_list_rename_tag_describe(lib, tiny_spec):
    lib.add(random_adapter(tiny_spec, "a", seed=1), tags=["x"])
    lib.add(random_adapter(tiny_spec, "b", seed=2))
    lib.rename("a", "c")
    assert lib.names() == ["b", "c"]
    assert lib.tag("c", "y") == ["x", "y"]
    assert lib.tag("c", "x", remove=True) == ["y"]
    assert [r.name for r in lib.list(tag="y")] == ["c"]
    assert lib.describe("b", description="new").description == "new"
    with pytest.raises(DuplicateNameError, match="'b' already exists"):
        lib.rename("c", "b")
    with pytest.raises(AdapterNotFoundError, match="no adapter named 'zzz'.*has: b, c"):
        lib.get("zzz")


def test_identical_content_shares_one_blob_until_last_reference_goes(lib, raw, tiny_spec):
    ad = random_adapter(tiny_spec, "a", seed=3)
    ra = lib.add(ad)
    rb = lib.add(ad, "b")
    assert ra.blob == rb.blob and raw.names() == {ra.blob}
    lib.remove("a")
    assert raw.names() == {ra.blob} and lib.get("b")
    lib.remove("b")
    assert raw.names() == set() and len(lib) == 0


def test_replace_bumps_version_and_drops_old_blob(lib, raw, tiny_spec):
    r1 = lib.add(random_adapter(tiny_spec, "a", seed=1))
    r2 = lib.add(random_adapter(tiny_spec, "a", seed=2), replace=True)
    assert (r1.version, r2.version) == (1, 2) and r1.blob != r2.blob
    assert raw.names() == {r2.blob}


def _bad(tiny_spec, kind):
    ad = random_adapter(tiny_spec, "bad", rank=2, seed=5)
    path = sorted(ad.modules)[0]
    if kind == "unknown_module":
        ad.modules["model.layers.7.self_attn.q_proj"] = ad.modules[path]
    elif kind == "shape":
        ad.modules[path].A = torch.zeros(2, 31)
    elif kind == "nan":
        ad.modules[path].B[0, 0] = float("nan")
    elif kind == "inf":
        ad.modules[path].A[0, 0] = float("inf")
    elif kind == "fingerprint":
        ad.base_model = BaseModelRef("other", "f" * 64)
    return ad


@pytest.mark.parametrize("kind, message", [
    ("unknown_module", r"1 module path\(s\) are not linear layers of the base model 'tiny-llama': model\.layers\.7\.self_attn\.q_proj"),
    ("shape", r"shape mismatch: model\.layers\.0\.mlp\.down_proj: A \(2, 31\), B \(32, 2\), expected A \(r, 64\)"),
    ("nan", r"NaN or Inf weights in model\.layers\.0\.mlp\.down_proj"),
    ("inf", r"NaN or Inf weights in model\.layers\.0\.mlp\.down_proj"),
    ("fingerprint", r"made for base model 'other' \(fingerprint ffffffffffff\), but this library's base model is 'tiny-llama'"),
])
def test_invalid_adapters_are_refused_and_library_unchanged(lib, tiny_spec, kind, message):
    lib.add(random_adapter(tiny_spec, "keep", seed=9))
    before = snapshot(lib)
    with pytest.raises(ValidationError, match=message):
        lib.add(_bad(tiny_spec, kind))
    assert snapshot(lib) == before
    if lib._blobs.is_local:
        assert list((lib.path / "tmp").iterdir()) == []


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "a..b", "x" * 129, "sp ace"])
def test_unsafe_names_are_refused(lib, tiny_spec, name):
    before = snapshot(lib)
    with pytest.raises(ValueError, match="invalid adapter name"):
        lib.add(random_adapter(tiny_spec, "ok", seed=1), name)
    assert snapshot(lib) == before


def test_duplicate_name_is_refused_unchanged(lib, tiny_spec):
    lib.add(random_adapter(tiny_spec, "a", seed=1))
    before = snapshot(lib)
    with pytest.raises(DuplicateNameError, match="an adapter named 'a' already exists"):
        lib.add(random_adapter(tiny_spec, "a", seed=2))
    assert snapshot(lib) == before


def test_name_taken_by_another_writer_after_the_check_leaves_no_blob(lib, tiny_spec, monkeypatch):
    lib.add(random_adapter(tiny_spec, "a", seed=1))
    before = snapshot(lib)
    monkeypatch.setattr(lib, "_row", lambda name: None)  # as if the name was free when checked
    with pytest.raises(DuplicateNameError, match="an adapter named 'a' already exists"):
        lib.add(random_adapter(tiny_spec, "a", seed=2))
    assert snapshot(lib) == before


def test_library_without_base_model_refuses_adds(tmp_path, tiny_spec):
    with Library.open(tmp_path / "nobase", create=True) as bare:
        with pytest.raises(ValidationError, match="has no base model yet"):
            bare.add(random_adapter(tiny_spec, "a"))


def test_opening_with_another_base_model_is_refused(lib, tiny_spec):
    from dataclasses import replace
    other = replace(tiny_spec, id="other", fingerprint="0" * 64)
    with pytest.raises(ValidationError, match="belongs to base model 'tiny-llama'"):
        reopen(lib, base_model=other)


def test_damaged_blob_is_detected_by_get_and_verify(lib, raw, tiny_spec):
    rec = lib.add(random_adapter(tiny_spec, "a", seed=1))
    lib.add(random_adapter(tiny_spec, "b", seed=2))
    data = bytearray(raw.read(rec.blob))
    data[-5] ^= 0xFF
    raw.write(rec.blob, bytes(data))
    with pytest.raises(CorruptBlobError, match="adapter 'a': blob .* is damaged"):
        lib.get("a")
    report = lib.verify()
    assert not report.ok and report.checked == 2
    assert [name for name, _ in report.damaged] == ["a"]


def other_machine(library: Library) -> Library:
    """A second writer of the same library (a team library: with its own cache)."""
    if library._blobs.is_local:
        return Library.open(library.path)
    return library._test_target.open("other")


@pytest.mark.parametrize("change", ["replace", "rename", "remove"])
def test_get_racing_a_change_that_deletes_its_blob_reads_what_the_row_says_now(lib, raw, tiny_spec, change):
    """A reader reads the row, then another machine replaces, renames or removes the adapter
    (deleting the old blob, except on rename) before the reader fetches the blob: the reader gets
    the new version, the version it saw, or 'not found', never a 'missing blob' corruption error
    (every blob a row references is intact)."""
    other = other_machine(lib)
    first_adapter = random_adapter(tiny_spec, "a", seed=1)
    first = other.add(first_adapter)
    second = random_adapter(tiny_spec, "a", seed=2)
    fetch, fetched = lib._blobs.get, []

    def racing_get(digest):
        if not fetched:  # between this reader's row read and its blob read
            {"replace": lambda: other.add(second, replace=True), "rename": lambda: other.rename("a", "b"),
             "remove": lambda: other.remove("a")}[change]()
        fetched.append(digest)
        return fetch(digest)

    lib._blobs.get = racing_get
    if change == "remove":
        with pytest.raises(AdapterNotFoundError, match="'a' was removed or renamed while it was being read"):
            lib.get("a")
        assert fetched == [first.blob] and first.blob not in raw.names()
    else:  # a rename keeps the blob: the read completes as of its row read
        got, want = lib.get("a"), (second if change == "replace" else first_adapter)
        assert all(torch.equal(got.modules[p].A, m.A) and torch.equal(got.modules[p].B, m.B)
                   for p, m in want.modules.items())
        assert fetched == ([first.blob, other.info("a").blob] if change == "replace" else [first.blob])
        assert (first.blob in raw.names()) == (change == "rename")
    del lib._blobs.get
    assert lib.verify().ok


def test_readding_repairs_a_damaged_shared_blob(lib, raw, tiny_spec):
    ad = random_adapter(tiny_spec, "a", seed=1)
    rec = lib.add(ad)
    raw.write(rec.blob, raw.read(rec.blob)[:-10] + b"0123456789")
    assert not lib.verify().ok
    lib.add(ad, "b")
    assert lib.verify().ok


def test_verify_reports_and_removes_orphan_blobs(lib, raw, tiny_spec, backend):
    lib.add(random_adapter(tiny_spec, "a", seed=1))
    orphan = "ff" * 32
    raw.write(orphan, b"left by a killed add")
    assert lib.verify().orphan_blobs == [orphan]
    lib.verify(fix_orphans=True)
    if backend == "team":  # a young orphan may be an add in flight on another machine: kept
        assert orphan in raw.names()
        assert lib.verify(fix_orphans=True, orphan_grace_s=3600).removed_orphans == []
        assert orphan in raw.names()
        assert lib.verify(fix_orphans=True, orphan_grace_s=0).removed_orphans == [orphan]
    assert orphan not in raw.names() and lib.verify().orphan_blobs == [] and lib.get("a")


def test_artifacts_are_versioned_verified_and_share_blob_cleanup(lib, raw, tiny_spec):
    lib.add(random_adapter(tiny_spec, "a", seed=1))
    t = {"w": torch.arange(6.0).view(2, 3)}
    assert lib.put_artifact("router", "gate", t, {"top_k": 2}, adapters=["a"]) == 1
    assert lib.put_artifact("router", "gate", {"w": t["w"] * 2}, {"top_k": 2}, adapters=["a"]) == 2
    tensors, config, adapters = lib.get_artifact("router", "gate")
    assert torch.equal(tensors["w"], t["w"] * 2) and config == {"top_k": 2} and adapters == ["a"]
    assert [a["version"] for a in lib.artifacts("router")] == [2]
    assert lib.verify().orphan_blobs == []  # the first version's blob was dropped
    with pytest.raises(AdapterNotFoundError, match="no router artifact named 'nope'"):
        lib.get_artifact("router", "nope")
    lib.remove_artifact("router", "gate")
    assert raw.names() == {lib.info("a").blob}  # only the adapter's blob is left
