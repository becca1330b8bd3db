"""The persisted adapter library: a SQLite catalog (WAL) beside content-addressed blobs.

Layout of a library directory::

    catalog.sqlite      adapters (name -> blob hash + metadata), derived data, meta
    blobs/ab/abcd...    canonical adapter bytes (see adapter.py), named by their sha256
    index/text.faiss    persisted search index over text embeddings
    tmp/                blobs being written
    library.lock        cross-process write lock

Durability and atomicity: a blob is written to ``tmp/``, fsynced, renamed into ``blobs/`` and
its directory fsynced *before* the row that references it is committed, so a process killed at
any point leaves either the whole adapter or none (at worst an unreferenced blob, which
``gc``/``verify`` reports and removes). Placing a blob + committing its row, and deleting a row +
unlinking its blob, happen under one file lock, so a concurrent ``remove`` can never delete a
blob that a concurrent ``add`` is about to reference. Readers take no lock (WAL).

Derived data (Arrow prototypes, svd and text embeddings) is cached in the catalog keyed by
(blob hash, kind, config hash) and recomputed when either changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .adapter import BaseModelRef, LoraAdapter, check_name
from .base_model import BaseModelSpec
from .derived import DerivedMixin
from .errors import (
    AdapterNotFoundError,
    CatalogError,
    CorruptBlobError,
    DuplicateNameError,
    ReadOnlyLibraryError,
    ValidationError,
)
from .index import IndexConfig, VectorIndex
from .peft_io import read_peft_dir, write_peft_dir
from .validate import validate_adapter

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    blob TEXT NOT NULL,
    size INTEGER NOT NULL,
    base_id TEXT NOT NULL,
    base_fingerprint TEXT NOT NULL,
    rank INTEGER NOT NULL,
    alpha REAL NOT NULL,
    target_modules TEXT NOT NULL,
    n_modules INTEGER NOT NULL,
    n_params INTEGER NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    examples TEXT NOT NULL DEFAULT '[]',
    tags TEXT NOT NULL DEFAULT '[]',
    version INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS adapters_blob ON adapters(blob);
CREATE TABLE IF NOT EXISTS artifacts (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    blob TEXT NOT NULL,
    config TEXT NOT NULL,
    adapters TEXT NOT NULL DEFAULT '[]',
    version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE INDEX IF NOT EXISTS artifacts_blob ON artifacts(blob);
CREATE TABLE IF NOT EXISTS derived (
    blob TEXT NOT NULL,
    kind TEXT NOT NULL,
    config TEXT NOT NULL,
    data BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (blob, kind, config)
);
"""
_SCHEMA_VERSION = 1
_CATALOG = "catalog.sqlite"


@dataclass(frozen=True)
class AdapterRecord:
    """One catalog row: what ``list``/``info`` return (no tensors)."""

    name: str
    blob: str
    size: int
    base_id: str
    base_fingerprint: str
    rank: int
    alpha: float
    target_modules: list[str]
    n_modules: int
    n_params: int
    description: str
    examples: list[str]
    tags: list[str]
    version: int
    created_at: float
    updated_at: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class VerifyReport:
    checked: int
    damaged: list[tuple[str, str]]  # (adapter name, problem)
    orphan_blobs: list[str]
    refused: str | None = None  # why ``fix_orphans`` deleted nothing, when it refused

    @property
    def ok(self) -> bool:
        return not self.damaged

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checked": self.checked, "damaged": self.damaged,
                "orphan_blobs": self.orphan_blobs, "refused": self.refused}


@dataclass
class EmbeddingConfig:
    """How derived data is computed; part of each cache key."""

    svd_keep: float = 0.1  # fraction of weights kept by magnitude before the SVD
    svd_dims: int = 64
    text_batch_size: int = 64


class Library(DerivedMixin):
    """A directory of LoRA adapters for one base model. Open with :meth:`open`."""

    def __init__(self, path: Path, conn: sqlite3.Connection, embed_config: EmbeddingConfig,
                 index_config: IndexConfig, read_only: bool = False):
        self.path = path
        self._conn = conn
        self.read_only = read_only
        self._lock = _ReadOnlyLock(path) if read_only else FileLock(str(path / "library.lock"))
        self.embed_config = embed_config
        self.index_config = index_config
        self._loaded_text_index: VectorIndex | None = None  # reused while its stamp matches

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, base_model: nn.Module | BaseModelSpec | None = None,
             *, embed_config: EmbeddingConfig | None = None,
             index_config: IndexConfig | None = None, create: bool = False) -> Library:
        """Open the library at ``path``.

        A missing library is created only when ``base_model`` is given (or ``create=True``, which
        makes one not yet bound to a model); otherwise a typo in ``path`` is an error, not a new
        empty library. ``base_model`` (a loaded model or its :class:`BaseModelSpec`) binds an
        empty library to that model; for a bound library it must have the same fingerprint.

        A library in a location this process cannot write is opened read-only: reading works,
        every write raises :class:`ReadOnlyLibraryError`. A catalog that is empty (0 bytes) while
        blobs exist, or that SQLite cannot read, raises :class:`CatalogError` saying how to
        recover; the blobs are never touched.
        """
        path = Path(path)
        catalog = path / _CATALOG
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a library directory")
        exists = catalog.is_file()
        if exists:
            _check_catalog_size(path)
        elif base_model is None and not create:
            raise FileNotFoundError(f"no library at {path} (create one with Library.open(path, base_model=model) "
                                    f"or `quiver library init -L {path}`)")
        read_only = exists and not _writable(path)
        try:
            if read_only:
                conn = _connect_read_only(catalog)
            else:
                for sub in ("blobs", "tmp", "index"):
                    (path / sub).mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(catalog, timeout=60, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA busy_timeout=60000")
            conn.row_factory = sqlite3.Row
            lib = cls(path, conn, embed_config or EmbeddingConfig(), index_config or IndexConfig(), read_only)
            if read_only:
                lib._meta("schema_version")
            else:
                with lib._lock, lib._write():
                    for stmt in filter(str.strip, _SCHEMA.split(";")):
                        conn.execute(stmt)
                    conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(_SCHEMA_VERSION),))
                    conn.execute("INSERT OR IGNORE INTO meta VALUES ('generation', '0')")
        except sqlite3.DatabaseError as e:
            raise CatalogError(damaged_catalog_message(path, e)) from None
        if base_model is not None:
            lib.set_base_model(base_model)
        return lib

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self):
        """A write transaction (``BEGIN IMMEDIATE``) as a context manager."""
        self._check_writable()
        return _Transaction(self._conn)

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyLibraryError(f"library {self.path} is read-only (this user cannot write there); "
                                       "reading works, changes need write access")

    def _meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _bump_generation(self) -> None:
        self._conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")

    @property
    def generation(self) -> int:
        """Increases with every change to the set of adapters or their texts."""
        return int(self._meta("generation") or 0)

    # -- the base model ------------------------------------------------------------------------
    @property
    def base(self) -> BaseModelSpec | None:
        text = self._meta("base_model")
        return BaseModelSpec.from_json(text) if text else None

    def set_base_model(self, base_model: nn.Module | BaseModelSpec) -> BaseModelSpec:
        spec = base_model if isinstance(base_model, BaseModelSpec) else BaseModelSpec.from_model(base_model)
        with self._lock, self._write():
            current = self._meta("base_model")
            if current is None:
                self._conn.execute("INSERT INTO meta VALUES ('base_model', ?)", (spec.to_json(),))
                return spec
        old = BaseModelSpec.from_json(current)
        if old.fingerprint != spec.fingerprint:
            raise ValidationError(
                f"library {self.path} belongs to base model {old.id!r} (fingerprint "
                f"{old.fingerprint[:12]}), not {spec.id!r} (fingerprint {spec.fingerprint[:12]})"
            )
        return old

    def _require_base(self) -> BaseModelSpec:
        spec = self.base
        if spec is None:
            raise ValidationError(
                f"library {self.path} has no base model yet: open it with base_model=... "
                f"(or run `quiver library init -L {self.path}`) before adding adapters"
            )
        return spec

    # -- adding --------------------------------------------------------------------------------
    def add(self, adapter: LoraAdapter, name: str | None = None, *, description: str | None = None,
            examples: Sequence[str] | None = None, tags: Sequence[str] | None = None,
            replace: bool = False) -> AdapterRecord:
        """Validate and store ``adapter``; atomic (see the module docstring).

        With ``replace=True`` an existing adapter of that name is replaced and its ``version``
        increases; its description, examples and tags are kept unless new ones are given
        (``None`` = keep; ``""`` / ``[]`` = clear). Otherwise a duplicate name is an error.
        """
        self._check_writable()
        name = check_name(adapter.name if name is None else name)
        adapter.name = name
        spec = self._require_base()
        validate_adapter(adapter, spec)
        given = {"description": description,
                 "examples": None if examples is None else json.dumps(_str_list(examples, "examples")),
                 "tags": None if tags is None else json.dumps(_str_list(tags, "tags"))}
        if not replace and self._row(name) is not None:
            raise DuplicateNameError(f"an adapter named {name!r} already exists")
        data = adapter.to_bytes()

        def write_row(digest: str):
            old = self._row(name)
            if old is not None and not replace:
                raise DuplicateNameError(f"an adapter named {name!r} already exists")
            fresh = {"description": "", "examples": "[]", "tags": "[]"}
            meta = {k: v if v is not None else (old[k] if old is not None else fresh[k]) for k, v in given.items()}
            now = time.time()
            values = (
                name, digest, len(data), adapter.base_model.id, adapter.base_model.fingerprint,
                adapter.rank, adapter.alpha, json.dumps(adapter.target_modules),
                len(adapter.modules), adapter.num_parameters(), meta["description"],
                meta["examples"], meta["tags"],
                (old["version"] + 1) if old else 1, old["created_at"] if old else now, now,
            )
            self._conn.execute("INSERT OR REPLACE INTO adapters VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", values)
            self._bump_generation()
            return None, old["blob"] if old else None

        self._commit_blob(data, write_row)
        return self.info(name)

    def add_peft(self, peft_dir: str | os.PathLike, name: str, **kwargs) -> AdapterRecord:
        """Import a PEFT LoRA directory (see peft_io.py); same keyword arguments as :meth:`add`."""
        check_name(name)
        spec = self._require_base()
        adapter = read_peft_dir(peft_dir, name, BaseModelRef(spec.id, spec.fingerprint))
        return self.add(adapter, name, **kwargs)

    def _write_tmp(self, data: bytes) -> Path:
        tmp = self.path / "tmp" / f"{os.getpid()}-{time.time_ns()}.part"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _commit_blob(self, data: bytes, write_row):
        """Store ``data`` as a blob and reference it: the one atomic write path.

        ``write_row(digest)`` runs inside one transaction, under the library lock, after the
        blob is durably in place; it returns ``(result, replaced_blob_or_None)``. A replaced
        blob is deleted if nothing references it any more.
        """
        self._check_writable()
        digest = hashlib.sha256(data).hexdigest()
        tmp = self._write_tmp(data)
        try:
            with self._lock:
                self._place_blob(tmp, digest)
                with self._write():
                    result, replaced = write_row(digest)
                if replaced is not None and replaced != digest:
                    self._drop_blob_if_unused(replaced)
        finally:
            tmp.unlink(missing_ok=True)
        return result

    def _blob_path(self, digest: str) -> Path:
        return self.path / "blobs" / digest[:2] / digest

    def _place_blob(self, tmp: Path, digest: str) -> None:
        """Move a fsynced temp file to its content address (called under the lock)."""
        final = self._blob_path(digest)
        if final.is_file() and _sha256_file(final) == digest:
            return  # the same content is already stored (dedup)
        final.parent.mkdir(exist_ok=True)
        os.replace(tmp, final)
        _fsync_dir(final.parent)

    # -- reading --------------------------------------------------------------------------------
    def _row(self, name: str) -> sqlite3.Row | None:
        return self._conn.execute("SELECT * FROM adapters WHERE name=?", (name,)).fetchone()

    def info(self, name: str) -> AdapterRecord:
        row = self._row(name)
        if row is None:
            raise AdapterNotFoundError(self._not_found(name))
        return _record(row)

    def _not_found(self, name: str) -> str:
        names = [r.name for r in self.list()]
        hint = f"; the library has: {', '.join(names[:10])}" + (" ..." if len(names) > 10 else "") if names else "; the library is empty"
        return f"no adapter named {name!r} in {self.path}{hint}"

    def list(self, tag: str | None = None) -> list[AdapterRecord]:
        rows = self._conn.execute("SELECT * FROM adapters ORDER BY name").fetchall()
        records = [_record(r) for r in rows]
        return [r for r in records if tag is None or tag in r.tags]

    def names(self) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT name FROM adapters ORDER BY name")]

    def require(self, names) -> list[str]:
        """``names`` as a list if every one is in the library, else one error naming the missing."""
        names = list(names)
        present = set(self.names())
        missing = [n for n in names if n not in present]
        if missing:
            raise AdapterNotFoundError(f"adapter(s) not in the library {self.path}: {missing}")
        return names

    def __contains__(self, name: str) -> bool:
        return self._row(name) is not None

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM adapters").fetchone()[0]

    def get(self, name: str) -> LoraAdapter:
        """Load an adapter, verifying its bytes against the stored content hash."""
        rec = self.info(name)
        return LoraAdapter.from_bytes(self._read_blob(rec.blob, name), name)

    def _read_blob(self, digest: str, name: str) -> bytes:
        path = self._blob_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CorruptBlobError(f"adapter {name!r}: blob {digest[:12]} is missing") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise CorruptBlobError(f"adapter {name!r}: blob {digest[:12]} is damaged (hash mismatch)")
        return data

    def export_peft(self, name: str, out_dir: str | os.PathLike, overwrite: bool = False, *,
                    hint: str = "overwrite=True") -> Path:
        """Write adapter ``name`` as a PEFT LoRA directory (never into or over this library:
        the output-path rule of :mod:`quiver.library.paths`)."""
        return write_peft_dir(self.get(name), out_dir, overwrite=overwrite, protect=(self.path,), hint=hint)

    # -- changing -------------------------------------------------------------------------------
    def remove(self, name: str) -> None:
        """Delete an adapter; its blob goes when no other adapter references it."""
        with self._lock:
            with self._write():
                row = self._row(name)
                if row is None:
                    raise AdapterNotFoundError(self._not_found(name))
                self._conn.execute("DELETE FROM adapters WHERE name=?", (name,))
                self._bump_generation()
            self._drop_blob_if_unused(row["blob"])

    def _drop_blob_if_unused(self, digest: str) -> None:
        """Delete a blob and its derived data if no row references it (called under the lock)."""
        with self._write():
            used = self._conn.execute("SELECT 1 FROM adapters WHERE blob=? UNION ALL "
                                      "SELECT 1 FROM artifacts WHERE blob=? LIMIT 1", (digest, digest)).fetchone()
            if used:
                return
            self._conn.execute("DELETE FROM derived WHERE blob=?", (digest,))
        self._blob_path(digest).unlink(missing_ok=True)

    def rename(self, old: str, new: str) -> None:
        check_name(new)
        with self._write():
            if self._row(old) is None:
                raise AdapterNotFoundError(self._not_found(old))
            try:
                self._conn.execute("UPDATE adapters SET name=?, updated_at=? WHERE name=?",
                                   (new, time.time(), old))
            except sqlite3.IntegrityError:
                raise DuplicateNameError(f"an adapter named {new!r} already exists") from None
            self._bump_generation()

    def tag(self, name: str, *tags: str, remove: bool = False) -> list[str]:
        """Add (or with ``remove=True`` drop) tags; returns the adapter's tags."""
        tags_in = _str_list(tags, "tags")
        with self._write():
            row = self._row(name)
            if row is None:
                raise AdapterNotFoundError(self._not_found(name))
            current = json.loads(row["tags"])
            new = [t for t in current if t not in tags_in] if remove else current + [t for t in tags_in if t not in current]
            self._conn.execute("UPDATE adapters SET tags=?, updated_at=? WHERE name=?",
                               (json.dumps(new), time.time(), name))
        return new

    def describe(self, name: str, description: str | None = None,
                 examples: Sequence[str] | None = None) -> AdapterRecord:
        """Change an adapter's description and/or example prompts."""
        with self._write():
            row = self._row(name)
            if row is None:
                raise AdapterNotFoundError(self._not_found(name))
            desc = row["description"] if description is None else description
            ex = row["examples"] if examples is None else json.dumps(_str_list(examples, "examples"))
            self._conn.execute("UPDATE adapters SET description=?, examples=?, updated_at=? WHERE name=?",
                               (desc, ex, time.time(), name))
            self._bump_generation()
        return self.info(name)

    # -- integrity --------------------------------------------------------------------------------
    def verify(self, *, fix_orphans: bool = False) -> VerifyReport:
        """Re-hash every referenced blob; list damaged adapters and unreferenced blobs.

        ``fix_orphans`` deletes unreferenced blobs and the ``tmp/*.part`` files of writers that
        are gone (their process has exited, or they are over an hour old) -- but never blobs
        while the catalog looks damaged (SQLite's ``quick_check`` fails) or references nothing
        at all while blobs exist: then ``refused`` says why and every blob stays.
        """
        damaged: list[tuple[str, str]] = []
        try:
            problems = [r[0] for r in self._conn.execute("PRAGMA quick_check").fetchall()]
        except sqlite3.DatabaseError as e:
            problems = [str(e)]
        if problems != ["ok"]:
            raise CatalogError(damaged_catalog_message(self.path, "; ".join(problems[:3])))
        records = self.list()
        for rec in records:
            try:
                LoraAdapter.from_bytes(self._read_blob(rec.blob, rec.name), rec.name)
            except Exception as e:  # noqa: BLE001 -- every failure is reported, none raised
                damaged.append((rec.name, str(e)))
        with self._lock:
            referenced = {rec.blob for rec in self.list()} | {
                r[0] for r in self._conn.execute("SELECT blob FROM artifacts")}
            orphans = sorted(p.name for p in (self.path / "blobs").glob("*/*") if p.name not in referenced)
            refused = None
            if fix_orphans and orphans and not referenced:
                refused = (f"not deleting {len(orphans)} unreferenced blob(s): the catalog references no blob at "
                           "all, which looks like a lost or replaced catalog.sqlite; restore the catalog from a "
                           "backup, or remove the blobs by hand if the library really is empty")
            elif fix_orphans:
                for digest in orphans:
                    self._drop_blob_if_unused(digest)
            if fix_orphans:
                for part in (self.path / "tmp").glob("*.part"):
                    if _abandoned(part):
                        part.unlink(missing_ok=True)
        return VerifyReport(checked=len(records), damaged=damaged, orphan_blobs=orphans, refused=refused)

    # -- artifacts (trained routers, shard pools, ...) ------------------------------------------------
    def put_artifact(self, kind: str, name: str, tensors: dict[str, torch.Tensor], config: dict,
                     adapters: Sequence[str] = ()) -> int:
        """Store named tensors + a JSON config as artifact ``(kind, name)``; returns its version.

        Stored like adapters (content-addressed safetensors blob, atomic, never unpickled);
        ``adapters`` records which adapters the artifact belongs to (e.g. a router's experts).
        Storing the same (kind, name) again makes a new version.
        """
        check_name(kind), check_name(name)
        data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                       metadata={"quiver-artifact": json.dumps({"kind": kind, "config": config}, sort_keys=True)})

        def write_row(digest: str):
            old = self._conn.execute("SELECT blob, version FROM artifacts WHERE kind=? AND name=?",
                                     (kind, name)).fetchone()
            version = old["version"] + 1 if old else 1
            self._conn.execute("INSERT OR REPLACE INTO artifacts VALUES (?,?,?,?,?,?,?)",
                               (kind, name, digest, json.dumps(config, sort_keys=True),
                                json.dumps(list(adapters)), version, time.time()))
            return version, old["blob"] if old else None

        return self._commit_blob(data, write_row)

    def get_artifact(self, kind: str, name: str) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
        """``(tensors, config, adapters)`` of artifact ``(kind, name)``, verified by hash."""
        row = self._conn.execute("SELECT * FROM artifacts WHERE kind=? AND name=?", (kind, name)).fetchone()
        if row is None:
            have = [r[0] for r in self._conn.execute("SELECT name FROM artifacts WHERE kind=?", (kind,))]
            raise AdapterNotFoundError(f"no {kind} artifact named {name!r} in {self.path} (have: {have})")
        tensors = st_load(self._read_blob(row["blob"], f"{kind}/{name}"))
        return tensors, json.loads(row["config"]), json.loads(row["adapters"])

    def get_router(self, name: str):
        """Router artefact ``name`` rebuilt as a router (see ``quiver.routing.persist``)."""
        return _artifact_handler("router").load(self, name)

    def save_router(self, name: str, router) -> int:
        """Store a router as router artefact ``name``; returns its version."""
        return _artifact_handler("router").save(self, name, router)

    def artifacts(self, kind: str | None = None) -> list[dict]:
        rows = self._conn.execute("SELECT kind, name, version, adapters, created_at FROM artifacts "
                                  "WHERE ? IS NULL OR kind=? ORDER BY kind, name", (kind, kind)).fetchall()
        return [dict(r) | {"adapters": json.loads(r["adapters"])} for r in rows]

    def remove_artifact(self, kind: str, name: str) -> None:
        with self._lock:
            with self._write():
                row = self._conn.execute("SELECT blob FROM artifacts WHERE kind=? AND name=?", (kind, name)).fetchone()
                if row is None:
                    raise AdapterNotFoundError(f"no {kind} artifact named {name!r} in {self.path}")
                self._conn.execute("DELETE FROM artifacts WHERE kind=? AND name=?", (kind, name))
            self._drop_blob_if_unused(row["blob"])

    # -- derived data --------------------------------------------------------------------------------
    def _derived(self, blob: str, kind: str, config: str) -> bytes | None:
        row = self._conn.execute("SELECT data FROM derived WHERE blob=? AND kind=? AND config=?",
                                 (blob, kind, config)).fetchone()
        return row[0] if row else None

    def _put_derived(self, items: Iterable[tuple[str, str, str, bytes]]) -> None:
        if self.read_only:
            return  # computed for this process only; a read-only library caches nothing
        now = time.time()
        with self._write():
            self._conn.executemany("INSERT OR REPLACE INTO derived VALUES (?,?,?,?,?)",
                                   [(*item, now) for item in items])


# Upper layers register how their artefact kinds become objects (routing registers "router"),
# so the library serves them without importing those layers.
ARTIFACT_HANDLERS: dict[str, object] = {}


def _artifact_handler(kind: str):
    if kind not in ARTIFACT_HANDLERS:
        import importlib

        importlib.import_module("quiver.routing")  # registers the "router" handler
    return ARTIFACT_HANDLERS[kind]


def damaged_catalog_message(path: Path, problem) -> str:
    return (f"the catalog {path / _CATALOG} is damaged ({problem}); the adapters' bytes in {path / 'blobs'} "
            "are untouched: restore catalog.sqlite from a backup, or move it aside, run "
            f"`quiver library init -L {path}` and add the adapters again")


def _check_catalog_size(path: Path) -> None:
    """A 0-byte catalog beside stored blobs was truncated or lost: refuse to treat it as empty."""
    if (path / _CATALOG).stat().st_size == 0:
        blobs = sum(1 for _ in (path / "blobs").glob("*/*"))
        if blobs:
            raise CatalogError(damaged_catalog_message(path, f"it is empty (0 bytes) while blobs/ holds "
                                                             f"{blobs} blob(s)"))


def _writable(path: Path) -> bool:
    """Whether this process can create files in ``path`` (tried, since permission bits do not
    tell for root, read-only mounts or immutable directories)."""
    if not os.access(path, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def _connect_read_only(catalog: Path) -> sqlite3.Connection:
    """A read-only connection: ``mode=ro``, or ``immutable=1`` where SQLite cannot create its
    WAL index beside a read-only catalog."""
    uri = catalog.resolve().as_uri()
    try:
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        return conn
    except sqlite3.OperationalError:
        return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None,
                               check_same_thread=False)


def _abandoned(part: Path) -> bool:
    """A ``tmp/<pid>-<ns>.part`` file whose writer is gone (no such process) or is over an hour old."""
    try:
        if time.time() - part.stat().st_mtime > 3600:
            return True
        pid = int(part.name.split("-", 1)[0])
    except (OSError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class _ReadOnlyLock:
    """Stands in for the write lock of a read-only library: taking it is refusing the write."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        raise ReadOnlyLibraryError(f"library {self.path} is read-only (this user cannot write there); "
                                   "reading works, changes need write access")

    def __exit__(self, *exc):
        return False


class _Transaction:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def _record(row: sqlite3.Row) -> AdapterRecord:
    d = dict(row)
    for key in ("target_modules", "examples", "tags"):
        d[key] = json.loads(d[key])
    return AdapterRecord(**d)


def _str_list(values: Sequence[str] | str, what: str) -> list[str]:
    if isinstance(values, str):
        values = [values]
    values = list(values)
    if not all(isinstance(v, str) for v in values):
        raise ValidationError(f"{what} must be strings")
    return values


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
