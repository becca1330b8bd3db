"""The persisted adapter library: one catalog logic over a catalog backend and a blob store.

Two deployments, one class (:class:`Library`):

- **local** (``Library.open("dir")``): ``dir/catalog.sqlite`` (WAL) beside ``dir/blobs/``;
- **team** (``Library.open("postgresql://user@host:port/db", blobs="s3://bucket/prefix")``): the
  catalog in PostgreSQL, the blobs in S3-compatible object storage, a verified read-through cache
  and the search index on each machine (under ``$QUIVER_CACHE``).

The catalog's database is :mod:`quiver.library.catalog` (SQLite or PostgreSQL: the same SQL),
the bytes' store is :mod:`quiver.library.blobs` (a directory or S3). This module holds opening
and the adapter rows; the rest of :class:`Library` comes from one mixin per concern:
:mod:`~quiver.library.blob_refs` (the atomic write path, verified reads, unreferenced blobs),
:mod:`~quiver.library.artifacts` (routers, MoS pools), :mod:`~quiver.library.derived`
(embeddings, search, clustering) and :mod:`~quiver.library.integrity` (``verify``); the
records they return are :mod:`~quiver.library.records`. Everything is written once for both.

Layout of a local library directory::

    catalog.sqlite      adapters (name -> blob hash + metadata), artifacts, derived data, meta
    blobs/ab/abcd...    canonical adapter bytes (see adapter.py), named by their sha256
    index/text.faiss    persisted search index over text embeddings
    tmp/                blobs being written
    library.lock        cross-process write lock

Durability and atomicity: a blob is put durably (local: temp file, fsync, rename, fsync of the
directory; S3: a PUT, atomic by the protocol) *before* the one transaction that commits the row
referencing it, so a process killed at any point leaves either the whole adapter or none (at
worst an unreferenced blob, which ``verify`` reports and ``verify(fix_orphans=True)`` removes).
Putting a blob + committing its row, and deciding a blob is unused + deleting it, happen under
the catalog's blob lock (local: one file lock; PostgreSQL: an advisory lock per digest), so a
concurrent ``remove`` can never delete a blob that a concurrent ``add`` is about to reference.
Readers take no lock. Every blob is checked against its hash when read.

Derived data (Arrow prototypes, svd and text embeddings) is cached in the catalog keyed by
(blob hash, kind, config hash) and recomputed when either changes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from .adapter import BaseModelRef, LoraAdapter, check_name
from .artifacts import ArtifactsMixin
from .base_model import BaseModelSpec, default_cache_dir
from .blob_refs import BlobRefsMixin
from .blobs import open_blob_store
from .catalog import Catalog, is_postgres_url, open_catalog
from .derived import DerivedMixin
from .errors import (
    AdapterNotFoundError,
    CatalogError,
    DuplicateNameError,
    ReadOnlyLibraryError,
    ValidationError,
)
from .index import IndexConfig, VectorIndex
from .integrity import (
    CATALOG_FILE,
    IntegrityMixin,
    check_catalog_size,
    damaged_catalog_message,
)
from .peft_io import read_peft_dir, write_peft_dir
from .records import AdapterRecord, EmbeddingConfig, record_from_row, str_list
from .validate import validate_adapter

# Columns of ``adapters`` in table order (one list for INSERT and UPDATE).
_ADAPTER_COLUMNS = ("name", "blob", "size", "base_id", "base_fingerprint", "rank", "alpha", "target_modules",
                    "n_modules", "n_params", "description", "examples", "tags", "version", "created_at",
                    "updated_at")



class Library(BlobRefsMixin, DerivedMixin, ArtifactsMixin, IntegrityMixin):
    """LoRA adapters for one base model: a catalog + a blob store. Open with :meth:`open`."""

    def __init__(self, path: Path | str, catalog: Catalog, blobs, embed_config: EmbeddingConfig,
                 index_config: IndexConfig, index_dir: Path):
        self.path = path  # the directory (local) or the catalog URL without its password (team)
        self._catalog = catalog
        self._blobs = blobs
        self.read_only = getattr(catalog, "read_only", False)
        self._lock = catalog.lock()
        self.embed_config = embed_config
        self.index_config = index_config
        self._index_dir = index_dir  # the search index is always machine-local
        self._loaded_text_index: VectorIndex | None = None  # reused while its stamp matches

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, base_model: nn.Module | BaseModelSpec | None = None,
             *, blobs: str | None = None, cache_dir: str | os.PathLike | None = None,
             embed_config: EmbeddingConfig | None = None,
             index_config: IndexConfig | None = None, create: bool = False) -> Library:
        """Open the library at ``path``.

        ``path`` is a directory (SQLite catalog + ``blobs/`` inside it) or a
        ``postgresql://user[:password]@host:port/db`` URL (password also from ``PGPASSWORD`` or
        ``~/.pgpass``). ``blobs="s3://bucket/prefix"`` puts the blobs in S3-compatible storage
        (required for a PostgreSQL catalog; remembered in the catalog, so later opens may omit
        it). ``cache_dir`` (default ``$QUIVER_CACHE``) holds this machine's blob cache and
        search index of a library whose blobs are in S3.

        A missing library is created only when ``base_model`` is given (or ``create=True``, which
        makes one not yet bound to a model); otherwise a typo in ``path`` is an error, not a new
        empty library. ``base_model`` (a loaded model or its :class:`BaseModelSpec`) binds an
        empty library to that model; for a bound library it must have the same fingerprint.

        A local library in a location this process cannot write is opened read-only: reading
        works, every write raises :class:`ReadOnlyLibraryError`. A catalog that is empty (0 bytes)
        while blobs exist, or that SQLite cannot read, raises :class:`CatalogError` saying how to
        recover; the blobs are never touched.
        """
        team = is_postgres_url(path)
        read_only = False
        if not team:
            path = Path(path)
            if path.exists() and not path.is_dir():
                raise NotADirectoryError(f"{path} exists and is not a library directory")
            exists = (path / CATALOG_FILE).is_file()
            if exists:
                check_catalog_size(path)
            elif base_model is None and not create:
                raise FileNotFoundError(f"no library at {path} (create one with Library.open(path, base_model=model) "
                                        f"or `quiver library init -L {path}`)")
            read_only = exists and not _writable(path)
            if not read_only:
                path.mkdir(parents=True, exist_ok=True)
        try:
            catalog = open_catalog(path, read_only=read_only)
        except sqlite3.DatabaseError as e:
            raise CatalogError(damaged_catalog_message(path, e)) from None
        try:
            try:
                catalog.ensure_schema()
            except sqlite3.DatabaseError as e:
                raise CatalogError(damaged_catalog_message(path, e)) from None
            location = cls._blob_location(catalog, blobs)
            cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            store = open_blob_store(location, None if team else path, cache)
            library_id = catalog.meta("library_id")
            index_dir = path / "index" if store.is_local else cache / "index" / library_id
            if not read_only:
                index_dir.mkdir(parents=True, exist_ok=True)
        except BaseException:
            catalog.close()
            raise
        lib = cls(path if not team else catalog.location, catalog, store,
                  embed_config or EmbeddingConfig(), index_config or IndexConfig(), index_dir)
        if base_model is not None:
            lib.set_base_model(base_model)
        return lib

    @staticmethod
    def _blob_location(catalog: Catalog, blobs: str | None) -> str | None:
        """The blob store this catalog uses: recorded on first open, checked on later ones."""
        if blobs is not None and not str(blobs).startswith("s3://"):
            raise ValueError(f"blobs must be an s3://bucket/prefix URL, got {blobs!r}")
        if blobs is not None:
            blobs = str(blobs).rstrip("/")
            with catalog.transaction():
                catalog.execute("INSERT INTO meta (key, value) VALUES ('blobs', ?) ON CONFLICT (key) DO NOTHING",
                                (blobs,))
        stored = catalog.meta("blobs")
        if blobs is not None and stored != blobs:
            raise ValidationError(f"the library at {catalog.location} keeps its blobs in {stored}, not {blobs}")
        if stored is None and not catalog.is_local:
            raise ValueError(f"the library at {catalog.location} has no blob store yet: "
                             "open it with blobs='s3://bucket/prefix' (CLI: library.blobs=s3://...)")
        return stored

    def close(self) -> None:
        self._catalog.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Library({str(self.path)!r}, blobs={self._blobs.location!r})"

    @property
    def location(self) -> str:
        """Where the library lives, safe to print: its directory, or the catalog URL without
        a password and the blob store URL."""
        return str(self.path) if self._blobs.is_local else f"{self.path} + {self._blobs.location}"

    def _write(self):
        """A write transaction as a context manager."""
        self._check_writable()
        return self._catalog.transaction()

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyLibraryError(f"library {self.path} is read-only (this user cannot write there); "
                                       "reading works, changes need write access")

    def _meta(self, key: str) -> str | None:
        return self._catalog.meta(key)

    def _bump_generation(self) -> None:
        self._catalog.execute("UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) "
                              "WHERE key='generation'")

    @property
    def generation(self) -> int:
        """Increases with every change to the set of adapters or their texts (on any machine)."""
        return int(self._meta("generation") or 0)

    # -- the base model ------------------------------------------------------------------------
    @property
    def base(self) -> BaseModelSpec | None:
        text = self._meta("base_model")
        return BaseModelSpec.from_json(text) if text else None

    def set_base_model(self, base_model: nn.Module | BaseModelSpec) -> BaseModelSpec:
        spec = base_model if isinstance(base_model, BaseModelSpec) else BaseModelSpec.from_model(base_model)
        with self._write():
            self._catalog.execute("INSERT INTO meta (key, value) VALUES ('base_model', ?) "
                                  "ON CONFLICT (key) DO NOTHING", (spec.to_json(),))
            current = self._meta("base_model")
        old = BaseModelSpec.from_json(current)
        if old.fingerprint != spec.fingerprint:
            raise ValidationError(
                f"library {self.path} belongs to base model {old.id!r} (fingerprint "
                f"{old.fingerprint[:12]}), not {spec.id!r} (fingerprint {spec.fingerprint[:12]})"
            )
        return old if current != spec.to_json() else spec

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
                 "examples": None if examples is None else json.dumps(str_list(examples, "examples")),
                 "tags": None if tags is None else json.dumps(str_list(tags, "tags"))}
        if not replace and self._row(name) is not None:
            raise DuplicateNameError(f"an adapter named {name!r} already exists")
        data = adapter.to_bytes()
        cat = self._catalog

        def write_row(digest: str):
            old = cat.one("SELECT blob, version, created_at, description, examples, tags FROM adapters WHERE name=?"
                          + cat.for_update, (name,))
            if old is not None and not replace:
                raise DuplicateNameError(f"an adapter named {name!r} already exists")
            fresh = {"description": "", "examples": "[]", "tags": "[]"}
            meta = {k: v if v is not None else (old[k] if old is not None else fresh[k]) for k, v in given.items()}
            now = time.time()
            values = (
                name, digest, len(data), adapter.base_model.id, adapter.base_model.fingerprint,
                adapter.rank, adapter.alpha, json.dumps(adapter.target_modules),
                len(adapter.modules), adapter.num_parameters(), meta["description"],
                meta["examples"], meta["tags"], 1, now, now,
            )
            cols = ", ".join(_ADAPTER_COLUMNS)
            sql = f"INSERT INTO adapters ({cols}) VALUES ({', '.join('?' * len(values))})"
            if replace:  # version and created_at carry over from the row being replaced
                keep = ("version", "created_at", "name")
                sql += " ON CONFLICT (name) DO UPDATE SET " + ", ".join(
                    f"{c}=excluded.{c}" for c in _ADAPTER_COLUMNS if c not in keep) + ", version=adapters.version + 1"
            try:
                cat.execute(sql, values)
            except cat.integrity_errors:  # another writer committed the name since the check
                raise DuplicateNameError(f"an adapter named {name!r} already exists") from None
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

    # -- reading --------------------------------------------------------------------------------
    def _row(self, name: str) -> dict | None:
        return self._catalog.one("SELECT * FROM adapters WHERE name=?", (name,))

    def info(self, name: str) -> AdapterRecord:
        row = self._row(name)
        if row is None:
            raise AdapterNotFoundError(self._not_found(name))
        return record_from_row(row)

    def _not_found(self, name: str) -> str:
        names = self.names()
        hint = f"; the library has: {', '.join(names[:10])}" + (" ..." if len(names) > 10 else "") if names else "; the library is empty"
        return f"no adapter named {name!r} in {self.path}{hint}"

    def list(self, tag: str | None = None) -> list[AdapterRecord]:
        records = [record_from_row(r) for r in self._catalog.all("SELECT * FROM adapters ORDER BY name")]
        return [r for r in records if tag is None or tag in r.tags]

    def names(self) -> list[str]:
        return [r["name"] for r in self._catalog.all("SELECT name FROM adapters ORDER BY name")]

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
        return self._catalog.one("SELECT COUNT(*) AS n FROM adapters")["n"]

    def get(self, name: str) -> LoraAdapter:
        """Load an adapter, verifying its bytes against the stored content hash."""
        rec = self.info(name)
        return LoraAdapter.from_bytes(self._read_blob(rec.blob, name, lambda: self._current_blob(name)), name)

    def _current_blob(self, name: str) -> str | None:
        """The blob adapter ``name`` references now (None once it is gone)."""
        row = self._catalog.one("SELECT blob FROM adapters WHERE name=?", (name,))
        return row["blob"] if row else None

    def export_peft(self, name: str, out_dir: str | os.PathLike, overwrite: bool = False, *,
                    hint: str = "overwrite=True") -> Path:
        """Write adapter ``name`` as a PEFT LoRA directory (never into or over this library:
        the output-path rule of :mod:`quiver.library.paths`)."""
        protect = (self.path,) if isinstance(self.path, Path) else ()
        return write_peft_dir(self.get(name), out_dir, overwrite=overwrite, protect=protect, hint=hint)

    # -- changing -------------------------------------------------------------------------------
    def remove(self, name: str) -> None:
        """Delete an adapter; its blob goes when no other adapter references it."""
        cat = self._catalog
        with self._write():
            row = cat.one("SELECT blob FROM adapters WHERE name=?" + cat.for_update, (name,))
            if row is None:
                raise AdapterNotFoundError(self._not_found(name))
            cat.execute("DELETE FROM adapters WHERE name=?", (name,))
            self._bump_generation()
        self._drop_blob_if_unused(row["blob"])

    def rename(self, old: str, new: str) -> None:
        check_name(new)
        cat = self._catalog
        with self._write():
            if cat.one("SELECT name FROM adapters WHERE name=?" + cat.for_update, (old,)) is None:
                raise AdapterNotFoundError(self._not_found(old))
            try:
                cat.execute("UPDATE adapters SET name=?, updated_at=? WHERE name=?", (new, time.time(), old))
            except cat.integrity_errors:
                raise DuplicateNameError(f"an adapter named {new!r} already exists") from None
            self._bump_generation()

    def tag(self, name: str, *tags: str, remove: bool = False) -> list[str]:
        """Add (or with ``remove=True`` drop) tags; returns the adapter's tags."""
        tags_in = str_list(tags, "tags")
        cat = self._catalog
        with self._write():
            row = cat.one("SELECT tags FROM adapters WHERE name=?" + cat.for_update, (name,))
            if row is None:
                raise AdapterNotFoundError(self._not_found(name))
            current = json.loads(row["tags"])
            new = [t for t in current if t not in tags_in] if remove else current + [t for t in tags_in if t not in current]
            cat.execute("UPDATE adapters SET tags=?, updated_at=? WHERE name=?", (json.dumps(new), time.time(), name))
        return new

    def describe(self, name: str, description: str | None = None,
                 examples: Sequence[str] | None = None) -> AdapterRecord:
        """Change an adapter's description and/or example prompts."""
        cat = self._catalog
        with self._write():
            row = cat.one("SELECT description, examples FROM adapters WHERE name=?" + cat.for_update, (name,))
            if row is None:
                raise AdapterNotFoundError(self._not_found(name))
            desc = row["description"] if description is None else description
            ex = row["examples"] if examples is None else json.dumps(str_list(examples, "examples"))
            cat.execute("UPDATE adapters SET description=?, examples=?, updated_at=? WHERE name=?",
                        (desc, ex, time.time(), name))
            self._bump_generation()
        return self.info(name)


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
