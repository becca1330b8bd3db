"""The catalog's storage: one SQL logic (written in :mod:`quiver.library.store`) over two databases.

- :class:`SQLiteCatalog`: ``catalog.sqlite`` in a library directory (WAL, ``synchronous=FULL``);
  writers serialise on ``BEGIN IMMEDIATE`` and on a file lock (``library.lock``).
- :class:`PostgresCatalog`: a PostgreSQL database shared by a team (psycopg 3). Writers use
  ordinary transactions (READ COMMITTED) with row locks (``SELECT ... FOR UPDATE``) where a
  read decides a write, and PostgreSQL advisory locks where the SQLite library takes its file
  lock: one per blob digest (see :meth:`Catalog.blob_lock`), so adds of different content never
  wait for each other.

Both speak the same SQL: statements are written once with ``?`` placeholders and the upsert
forms both databases accept (``INSERT ... ON CONFLICT ... DO UPDATE/NOTHING``); the few
differences (column types, ``FOR UPDATE``, placeholder style, which exception is a unique
violation) are attributes of the backend. Rows come back as plain ``dict``.

Schema: created on first open and versioned by ``meta.schema_version``. :data:`MIGRATIONS` maps
each version to the step that brings a catalog from the previous version to it; opening runs the
missing steps in order, in one transaction, under a lock, so any number of processes may open a
catalog at once. A catalog newer than this code is refused.

Credentials never leave the connection: :attr:`Catalog.location` (used in every message) is the
URL without its password, and connection errors are re-raised with the password scrubbed.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from .errors import CatalogError, ReadOnlyLibraryError

SCHEMA_VERSION = 2

# Version 1: the tables. ``{int}``, ``{float}``, ``{bytes}`` are the dialect's column types.
_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    blob TEXT NOT NULL,
    size {int} NOT NULL,
    base_id TEXT NOT NULL,
    base_fingerprint TEXT NOT NULL,
    rank {int} NOT NULL,
    alpha {float} NOT NULL,
    target_modules TEXT NOT NULL,
    n_modules {int} NOT NULL,
    n_params {int} NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    examples TEXT NOT NULL DEFAULT '[]',
    tags TEXT NOT NULL DEFAULT '[]',
    version {int} NOT NULL DEFAULT 1,
    created_at {float} NOT NULL,
    updated_at {float} NOT NULL
);
CREATE INDEX IF NOT EXISTS adapters_blob ON adapters(blob);
CREATE TABLE IF NOT EXISTS artifacts (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    blob TEXT NOT NULL,
    config TEXT NOT NULL,
    adapters TEXT NOT NULL DEFAULT '[]',
    version {int} NOT NULL,
    created_at {float} NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE INDEX IF NOT EXISTS artifacts_blob ON artifacts(blob);
CREATE TABLE IF NOT EXISTS derived (
    blob TEXT NOT NULL,
    kind TEXT NOT NULL,
    config TEXT NOT NULL,
    data {bytes} NOT NULL,
    created_at {float} NOT NULL,
    PRIMARY KEY (blob, kind, config)
)
"""


def _v2_library_id(cat: Catalog) -> None:
    """Version 2: every library gets a stable random id (it keys the machine-local search index)."""
    cat.execute("INSERT INTO meta (key, value) VALUES ('library_id', ?) ON CONFLICT (key) DO NOTHING",
                (uuid.uuid4().hex,))


# version -> the step from version - 1 (run inside the schema transaction)
MIGRATIONS: dict[int, Callable[[Catalog], None]] = {2: _v2_library_id}


class Catalog:
    """What the library needs from a SQL database. Subclasses set the dialect attributes."""

    types: dict[str, str]
    for_update: str = ""  # appended to a SELECT whose result decides a write
    integrity_errors: tuple[type[BaseException], ...] = ()
    location: str  # for messages: never contains a password
    is_local: bool

    # -- statements ---------------------------------------------------------------------------
    def _sql(self, sql: str) -> str:
        return sql

    def execute(self, sql: str, params: Sequence = ()):
        return self._conn.execute(self._sql(sql), tuple(params))

    def one(self, sql: str, params: Sequence = ()) -> dict | None:
        return self.execute(sql, params).fetchone()

    def all(self, sql: str, params: Sequence = ()) -> list[dict]:
        return self.execute(sql, params).fetchall()

    def many(self, sql: str, rows: Iterable[Sequence]) -> None:
        rows = [tuple(r) for r in rows]
        if rows:
            self._conn.cursor().executemany(self._sql(sql), rows)

    # -- transactions and locks -----------------------------------------------------------------
    def transaction(self):
        """A write transaction as a context manager (rolled back on an exception)."""
        raise NotImplementedError

    def lock(self):
        """The library-wide write lock (a reentrant context manager)."""
        raise NotImplementedError

    def blob_lock(self, digest: str):
        """Held while a blob is put and its row committed, and while an unused blob is deleted,
        so that deleting a blob nobody references can never race an add about to reference it."""
        raise NotImplementedError

    def close(self) -> None:
        self._conn.close()

    # -- schema ---------------------------------------------------------------------------------
    def has_schema(self) -> bool:
        raise NotImplementedError

    def ensure_schema(self) -> None:
        """Create the tables if missing, then run the migrations this catalog has not had (a
        read-only catalog is only checked)."""
        if getattr(self, "read_only", False):
            version = int(self.meta("schema_version") or 0)
            if version != SCHEMA_VERSION:
                raise CatalogError(f"the read-only catalog at {self.location} has schema version {version}; this "
                                   f"Quiver needs {SCHEMA_VERSION} and cannot migrate it without write access")
            return
        with self.lock(), self.transaction():
            for stmt in filter(str.strip, _TABLES.format(**self.types).split(";")):
                self.execute(stmt)
            for key, value in (("schema_version", "1"), ("generation", "0")):
                self.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                             (key, value))
            version = int(self.one("SELECT value FROM meta WHERE key='schema_version'")["value"])
            if version > SCHEMA_VERSION:
                raise CatalogError(f"the catalog at {self.location} has schema version {version}, newer than "
                                   f"this Quiver's {SCHEMA_VERSION}: upgrade Quiver to open it")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[v](self)
                self.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(v),))

    def meta(self, key: str) -> str | None:
        row = self.one("SELECT value FROM meta WHERE key=?", (key,))
        return row["value"] if row else None


# -- SQLite -------------------------------------------------------------------------------------
def _dict_row(cursor: sqlite3.Cursor, row: tuple) -> dict:
    return {d[0]: v for d, v in zip(cursor.description, row)}


class SQLiteCatalog(Catalog):
    types = {"int": "INTEGER", "float": "REAL", "bytes": "BLOB"}
    integrity_errors = (sqlite3.IntegrityError,)
    is_local = True

    def __init__(self, directory: Path, read_only: bool = False):
        self.location = str(directory)
        self.path = directory / "catalog.sqlite"
        self.read_only = read_only
        if read_only:
            self._conn = _connect_read_only(self.path)
            self._file_lock = _ReadOnlyLock(directory)
        else:
            self._conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA busy_timeout=60000")
            self._file_lock = FileLock(str(directory / "library.lock"))
        self._conn.row_factory = _dict_row

    @property
    def connection(self) -> sqlite3.Connection:
        return self._conn

    @contextmanager
    def transaction(self):
        if self.read_only:
            raise ReadOnlyLibraryError(f"library {self.location} is read-only (this user cannot write there); "
                                       "reading works, changes need write access")
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def lock(self):
        return self._file_lock

    def blob_lock(self, digest: str):
        return self._file_lock  # one lock for the whole directory, as before the split

    def has_schema(self) -> bool:
        return self.one("SELECT 1 AS x FROM sqlite_master WHERE type='table' AND name='meta'") is not None


# -- PostgreSQL ---------------------------------------------------------------------------------
def is_postgres_url(location) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def mask_url(url: str) -> str:
    """``postgresql://user@host:port/db`` for any PostgreSQL URL: the password (and every query
    parameter, which may carry one) is left out."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        d = conninfo_to_dict(url)
    except Exception:  # noqa: BLE001 -- an unparsable URL is shown by scheme only
        return "postgresql://<unparsable URL>"
    user = f"{d['user']}@" if d.get("user") else ""
    port = f":{d['port']}" if d.get("port") else ""
    return f"postgresql://{user}{d.get('host', '')}{port}/{d.get('dbname', '')}"


def _advisory_key(text: str) -> int:
    return int.from_bytes(hashlib.sha256(f"quiver:{text}".encode()).digest()[:8], "big", signed=True)


class _AdvisoryLock:
    """A PostgreSQL session-level advisory lock; released by the server if the process dies."""

    def __init__(self, catalog: PostgresCatalog, key: int):
        self.catalog, self.key = catalog, key

    def __enter__(self):
        self.catalog._conn.execute("SELECT pg_advisory_lock(%s)", (self.key,))
        return self

    def __exit__(self, *exc):
        self.catalog._conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))


class PostgresCatalog(Catalog):
    types = {"int": "BIGINT", "float": "DOUBLE PRECISION", "bytes": "BYTEA"}
    for_update = " FOR UPDATE"
    is_local = False

    def __init__(self, url: str):
        import psycopg
        from psycopg.conninfo import conninfo_to_dict
        from psycopg.rows import dict_row

        self.location = mask_url(url)
        self.integrity_errors = (psycopg.IntegrityError,)
        try:
            password = conninfo_to_dict(url).get("password") or os.environ.get("PGPASSWORD")
        except Exception:  # noqa: BLE001
            password = None
        try:
            self._conn = psycopg.connect(url, autocommit=True, row_factory=dict_row,
                                         application_name="quiver")
        except Exception as e:  # noqa: BLE001 -- re-raised without the password
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if password:
                message = message.replace(password, "***")
            raise CatalogError(f"cannot connect to the catalog at {self.location}: {message}") from None

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    @property
    def connection(self):
        return self._conn

    @contextmanager
    def transaction(self):
        with self._conn.transaction():
            yield self

    def lock(self):
        return _AdvisoryLock(self, _advisory_key("library"))

    def blob_lock(self, digest: str):
        return _AdvisoryLock(self, _advisory_key(f"blob:{digest}"))

    def has_schema(self) -> bool:
        return self.one("SELECT to_regclass('meta') AS t")["t"] is not None


def open_catalog(location: str | os.PathLike, read_only: bool = False) -> Catalog:
    """``postgresql://...`` -> :class:`PostgresCatalog`; anything else is a library directory
    (``read_only``: a directory this process cannot write)."""
    if is_postgres_url(location):
        return PostgresCatalog(location)
    return SQLiteCatalog(Path(location), read_only=read_only)


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


class _ReadOnlyLock:
    """Stands in for the write lock of a read-only library: taking it is refusing the write."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        raise ReadOnlyLibraryError(f"library {self.path} is read-only (this user cannot write there); "
                                   "reading works, changes need write access")

    def __exit__(self, *exc):
        return False
