"""The team library's own guarantees, on real servers: concurrent machines, damaged objects,
the machine-local search index, schema versions, credentials never shown."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from quiver.library import CorruptBlobError, Library, ValidationError
from quiver.library.blobs import BlobStoreError
from quiver.library.catalog import SCHEMA_VERSION, CatalogError
from quiver.library.synthetic import random_adapter

# One "machine": adds, replaces, renames and removes its own adapters and tries to add the one
# name every machine wants ("shared"); prints each operation after it returned.
MACHINE = textwrap.dedent("""
    import sys
    from quiver.library import DuplicateNameError, Library
    from quiver.library.synthetic import random_adapter

    path, w, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    lib = Library.open(path)
    current = {}
    try:
        lib.add(random_adapter(lib.base, "shared", rank=2, seed=hash(w) % 1000))
        print("added shared", flush=True)
    except DuplicateNameError as e:
        print("dup", e, flush=True)
    for i in range(n):
        name = f"{w}-{i}"
        lib.add(random_adapter(lib.base, name, rank=2, seed=hash(name) % 1000))
        current[name] = name
        print("added", name, flush=True)
        if i % 3 == 2:
            old = current[f"{w}-{i - 1}"]
            lib.add(random_adapter(lib.base, old, rank=2, seed=7 + i), replace=True)
            print("replaced", old, flush=True)
        if i % 4 == 3:
            old = current[f"{w}-{i - 2}"]
            lib.rename(old, old + "-r")
            current[f"{w}-{i - 2}"] = old + "-r"
            print("renamed", old, old + "-r", flush=True)
        if i % 5 == 4:
            victim = current.pop(f"{w}-{i - 4}")
            lib.remove(victim)
            print("removed", victim, flush=True)
""")

# A reader on its own machine: loads every listed adapter until told to stop. An adapter may
# vanish between list and get (removed or renamed); a damaged or missing blob never appears.
READER = textwrap.dedent("""
    import os, sys
    from quiver.library import AdapterNotFoundError, Library
    lib = Library.open(sys.argv[1])
    loads = 0
    while not os.path.exists(sys.argv[2]):
        for name in lib.names():
            try:
                assert lib.get(name).modules
                loads += 1
            except AdapterNotFoundError:
                pass
    print(loads)
""")


def spawn(code, team, machine, *args):
    """A process on its own "machine": its own cache folder."""
    env = dict(os.environ, QUIVER_CACHE=str(team.cache(machine)))
    return subprocess.Popen([sys.executable, "-c", code, team.url, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def replay(lines):
    """The catalog the printed operations imply: name -> version."""
    state = {}
    for line in lines:
        verb, *args = line.split()
        if verb == "added":
            state[args[0]] = 1
        elif verb == "replaced":
            state[args[0]] += 1
        elif verb == "renamed":
            state[args[1]] = state.pop(args[0])
        elif verb == "removed":
            del state[args[0]]
    return state


def test_machines_add_replace_rename_remove_at_once(team, tiny_spec, tmp_path):
    team.open(base_model=tiny_spec).close()
    stop = tmp_path / "stop"
    reader = spawn(READER, team, "reader", stop)
    writers = [spawn(MACHINE, team, f"m{k}", f"m{k}", 6) for k in range(3)]
    lines = []
    for p in writers:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        lines += out.splitlines()
    stop.touch()
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err
    assert int(out) > 0
    dups = [ln for ln in lines if ln.startswith("dup")]
    assert sum(ln == "added shared" for ln in lines) == 1 and len(dups) == 2
    assert all(ln == "dup an adapter named 'shared' already exists" for ln in dups)
    expected = replay(ln for ln in lines if not ln.startswith("dup"))
    with team.open("checker") as fresh:
        assert {r.name: r.version for r in fresh.list()} == expected
        assert any(v == 2 for v in expected.values()) and any(n.endswith("-r") for n in expected)
        report = fresh.verify()
        assert report.ok and report.checked == len(expected) and report.orphan_blobs == []
        assert {b.digest for b in fresh._blobs.list()} == {r.blob for r in fresh.list()}


def test_damaged_truncated_or_missing_objects_name_the_adapter(team, tiny_spec):
    a = team.open("a", base_model=tiny_spec)
    recs = {n: a.add(random_adapter(tiny_spec, n, seed=i)) for i, n in enumerate(["changed", "cut", "gone", "fine"])}
    client, store = team.s3.client(), a._blobs
    obj = lambda n: dict(Bucket=store.bucket, Key=store.key(recs[n].blob))  # noqa: E731
    data = bytearray(client.get_object(**obj("changed"))["Body"].read())
    data[len(data) // 2] ^= 0x01
    client.put_object(**obj("changed"), Body=bytes(data))
    client.put_object(**obj("cut"), Body=bytes(data[:100]))
    client.delete_object(**obj("gone"))

    b = team.open("b")  # another machine: nothing cached
    with pytest.raises(CorruptBlobError, match=r"adapter 'changed': blob \w+ is damaged \(hash mismatch\) in s3://"):
        b.get("changed")
    with pytest.raises(CorruptBlobError, match=r"adapter 'cut': blob \w+ is damaged"):
        b.get("cut")
    with pytest.raises(CorruptBlobError, match=r"adapter 'gone': blob \w+ is missing from s3://"):
        b.get("gone")
    assert b.get("fine").modules and len(b) == 4  # the rest keeps working
    report = b.verify()
    assert sorted(n for n, _ in report.damaged) == ["changed", "cut", "gone"] and report.checked == 4
    assert not (team.cache("b") / "blobs" / recs["changed"].blob[:2] / recs["changed"].blob).exists()  # never cached

    # A damaged cache copy is dropped and the intact object fetched again.
    cached = team.cache("b") / "blobs" / recs["fine"].blob[:2] / recs["fine"].blob
    cached.write_bytes(cached.read_bytes()[:-3] + b"xyz")
    assert b.get("fine").modules
    assert __import__("hashlib").sha256(cached.read_bytes()).hexdigest() == recs["fine"].blob


def test_search_index_follows_any_machines_change_and_stays_local(team, tiny_spec):
    a = team.open("a", base_model=tiny_spec)
    a.add(random_adapter(tiny_spec, "fr", seed=1), description="Translate English sentences into French.")
    a.add(random_adapter(tiny_spec, "sql", seed=2), description="Write SQL queries over a database.")
    assert a.search("say it in French", k=1)[0][0] == "fr"
    index_file = team.cache("a") / "index" / a._meta("library_id") / "text.faiss"
    built = index_file.stat().st_mtime_ns
    assert a.search("a SELECT statement", k=1)[0][0] == "sql" and index_file.stat().st_mtime_ns == built

    b = team.open("b")
    b.describe("sql", description="Translate English into German.")
    b.add(random_adapter(tiny_spec, "math", seed=3), description="Solve arithmetic word problems.")
    assert a.search("say it in German", k=1)[0][0] == "sql"  # rebuilt: the catalog changed elsewhere
    assert a.search("add 12 and 30", k=1)[0][0] == "math"
    assert index_file.stat().st_mtime_ns != built
    keys = [o["Key"] for o in team.s3.client().list_objects_v2(Bucket=a._blobs.bucket,
                                                                Prefix=a._blobs.prefix + "/")["Contents"]]
    assert len(keys) == 3 and all(k.rsplit("/", 1)[-1] in {r.blob for r in a.list()} for k in keys)


def test_schema_is_created_versioned_and_migrated(lib, tiny_spec):
    lib.add(random_adapter(tiny_spec, "a", seed=1))
    cat = lib._catalog
    assert cat.meta("schema_version") == str(SCHEMA_VERSION) == "2" and len(cat.meta("library_id")) == 32
    with cat.transaction():  # what a version-1 catalog looks like
        cat.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
        cat.execute("DELETE FROM meta WHERE key='library_id'")
    reopen = (lambda: Library.open(lib.path)) if lib._blobs.is_local else (lambda: lib._test_target.open("m1"))
    with reopen() as again:
        assert again._meta("schema_version") == "2" and len(again._meta("library_id")) == 32
        assert again.names() == ["a"] and again.get("a").modules
    with cat.transaction():
        cat.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(CatalogError, match="schema version 99, newer than this Quiver's 2"):
        reopen()


def test_passwords_never_appear(team, tiny_spec, caplog, monkeypatch, tiny_model_dir, peft_adapter_dir, tmp_path):
    from typer.testing import CliRunner

    from quiver.cli import app

    secret = team.pg.password
    assert secret in team.url
    caplog.set_level(logging.DEBUG)
    lib = team.open(base_model=tiny_spec)
    shown = [repr(lib), str(lib.path), lib.location]
    with pytest.raises(LookupError) as e:
        lib.get("nope")
    shown.append(str(e.value))
    bad = team.url.replace(f":{secret}@", ":wrong-password@")
    with pytest.raises(CatalogError, match="cannot connect to the catalog at postgresql://quiver@127.0.0.1") as e:
        Library.open(bad, blobs=team.blobs, cache_dir=team.cache())
    shown.append(str(e.value))
    assert "password authentication failed" in str(e.value)
    with pytest.raises(CatalogError) as e:
        Library.open(team.url.replace(str(team.pg.port), "1"), blobs=team.blobs)
    shown.append(str(e.value))
    monkeypatch.setenv("QUIVER_CACHE", str(tmp_path / "cli-cache"))
    r = CliRunner().invoke(app, ["library", "add", str(peft_adapter_dir("x", seed=1)), "--name", "x",
                                 "-L", team.url, f"library.blobs={team.blobs}"])
    assert r.exit_code == 0 and "added x" in r.output, r.output
    r = CliRunner().invoke(app, ["library", "list", "-L", team.url, "--json"])
    assert [x["name"] for x in json.loads(r.stdout)] == ["x"]
    shown += [r.output, caplog.text]
    assert all(secret not in s for s in shown)
    assert "postgresql://quiver@127.0.0.1" in repr(lib)


def test_blob_store_is_recorded_and_checked(team, tiny_spec):
    with pytest.raises(ValueError, match="has no blob store yet: open it with blobs='s3://bucket/prefix'"):
        Library.open(team.url, cache_dir=team.cache())
    team.open(base_model=tiny_spec).close()
    with Library.open(team.url, cache_dir=team.cache()) as again:  # remembered by the catalog
        assert again._blobs.location == team.blobs
    with pytest.raises(ValidationError, match=f"keeps its blobs in {team.blobs}, not s3://other/x"):
        Library.open(team.url, blobs="s3://other/x", cache_dir=team.cache())
    other = team.pg.create_database("t_nobucket")
    with pytest.raises(BlobStoreError, match="cannot use bucket 'no-such-bucket' at http://127.0.0.1"):
        Library.open(other, blobs="s3://no-such-bucket/p", cache_dir=team.cache())
