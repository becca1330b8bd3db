"""Blob stores: where the library keeps its content-addressed bytes (named by their sha256).

- :class:`LocalBlobStore`: ``blobs/ab/<sha256>`` in a library directory. A put writes
  ``tmp/<pid>-<ns>.part``, fsyncs it, renames it into place and fsyncs the directory.
- :class:`S3BlobStore`: objects ``<prefix>/ab/<sha256>`` in an S3-compatible bucket
  (``s3://bucket/prefix``), through boto3 with the standard AWS environment
  (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_DEFAULT_REGION``); nothing secret is stored or printed. Each machine keeps a read-through
  cache of the objects it has read or written under ``$QUIVER_CACHE/blobs/ab/<sha256>``; since
  a blob's name is its hash, one cache serves every library, and a cached copy is used only
  after it has been re-hashed (a damaged one is dropped and fetched again). The cache is never
  evicted by Quiver: delete the folder to reclaim space.

The store moves bytes; the library checks them: :meth:`get` returns what it read and the
caller compares it with the digest (so an error can name the adapter). A put of an existing
digest rewrites it, which also repairs a damaged copy.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import QuiverError


class BlobMissingError(QuiverError, FileNotFoundError):
    """No blob under that digest."""


class BlobStoreError(QuiverError):
    """The blob store cannot be reached or refused a request."""


@dataclass
class StoredBlob:
    digest: str
    age_s: float  # seconds since it was last written, by the store's own clock


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_digest(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes, tmp_dir: Path) -> None:
    """``data`` at ``path`` whole or not at all: temp file, fsync, rename, fsync the directory."""
    tmp = tmp_dir / f"{os.getpid()}-{time.time_ns()}.part"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


class LocalBlobStore:
    """``blobs/`` and ``tmp/`` of a library directory."""

    is_local = True

    def __init__(self, root: Path):
        self.root = root
        self.location = str(root / "blobs")
        for sub in ("blobs", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / "blobs" / digest[:2] / digest

    def _write_tmp(self, data: bytes) -> Path:
        tmp = self.root / "tmp" / f"{os.getpid()}-{time.time_ns()}.part"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _place(self, tmp: Path, digest: str) -> None:
        """Move a fsynced temp file to its content address."""
        final = self.path(digest)
        if final.is_file() and _sha256_file(final) == digest:
            return  # the same content is already stored (dedup)
        final.parent.mkdir(exist_ok=True)
        os.replace(tmp, final)
        _fsync_dir(final.parent)

    def put(self, digest: str, data: bytes) -> None:
        tmp = self._write_tmp(data)
        try:
            self._place(tmp, digest)
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise BlobMissingError(f"blob {digest[:12]} is missing") from None

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def list(self) -> list[StoredBlob]:
        now = time.time()
        return [StoredBlob(p.name, now - p.stat().st_mtime) for p in (self.root / "blobs").glob("*/*")
                if _is_digest(p.name)]

    def clean_tmp(self, older_than_s: float) -> None:
        """Delete the temp files of writers that are gone: their process has exited, or the
        file is older than ``older_than_s``."""
        for part in (self.root / "tmp").glob("*.part"):
            if _abandoned(part, older_than_s):
                part.unlink(missing_ok=True)


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")`` (prefix may be empty)."""
    if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise ValueError(f"blob store URL must look like s3://bucket/prefix, got {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")


class S3BlobStore:
    """Objects in an S3-compatible bucket with a verified read-through cache on this machine."""

    is_local = False

    def __init__(self, url: str, cache_dir: Path):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = parse_s3_url(url)
        self.location = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.cache = Path(cache_dir) / "blobs"
        self._tmp = Path(cache_dir) / "tmp"
        for d in (self.cache, self._tmp):
            d.mkdir(parents=True, exist_ok=True)
        # Endpoint, region and credentials come from the standard AWS environment/config files.
        self.client = boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}))
        self.endpoint = self.client.meta.endpoint_url
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:  # noqa: BLE001 -- one clear line instead of a botocore trace
            raise BlobStoreError(f"cannot use bucket {self.bucket!r} at {self.endpoint}: {_brief(e)} "
                                 "(the bucket must exist; credentials come from the AWS environment)") from None

    def key(self, digest: str) -> str:
        return f"{self.prefix}/{digest[:2]}/{digest}" if self.prefix else f"{digest[:2]}/{digest}"

    def _cache_path(self, digest: str) -> Path:
        return self.cache / digest[:2] / digest

    def put(self, digest: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(digest), Body=data)
        except Exception as e:  # noqa: BLE001
            raise BlobStoreError(f"cannot write blob {digest[:12]} to {self.location}: {_brief(e)}") from None
        self._cache_put(digest, data)

    def _cache_put(self, digest: str, data: bytes) -> None:
        try:
            _write_durably(self._cache_path(digest), data, self._tmp)
        except OSError:
            pass  # a cache that cannot be written only costs a later download

    def get(self, digest: str) -> bytes:
        """Cached bytes if they still hash to ``digest``, else the object (cached when intact)."""
        cached = self._cache_path(digest)
        try:
            data = cached.read_bytes()
            if sha256(data) == digest:
                return data
            cached.unlink(missing_ok=True)  # damaged cache copy: fetch again
        except FileNotFoundError:
            pass
        data = self.fetch(digest)
        if sha256(data) == digest:
            self._cache_put(digest, data)
        return data

    def fetch(self, digest: str) -> bytes:
        """The object's bytes from the store, bypassing the cache."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(digest))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise BlobMissingError(f"blob {digest[:12]} is missing from {self.location}") from None
        except Exception as e:  # noqa: BLE001
            raise BlobStoreError(f"cannot read blob {digest[:12]} from {self.location}: {_brief(e)}") from None

    def delete(self, digest: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(digest))
        except Exception as e:  # noqa: BLE001
            raise BlobStoreError(f"cannot delete blob {digest[:12]} from {self.location}: {_brief(e)}") from None
        self._cache_path(digest).unlink(missing_ok=True)

    def list(self) -> list[StoredBlob]:
        """Every blob under the prefix, aged by the server's clock (no skew with this machine)."""
        out = []
        prefix = f"{self.prefix}/" if self.prefix else ""
        token = None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self.client.list_objects_v2(**kwargs)
            date = resp["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
            now = email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()
            for obj in resp.get("Contents", []):
                name = obj["Key"].rsplit("/", 1)[-1]
                if _is_digest(name) and obj["Key"] == self.key(name):
                    out.append(StoredBlob(name, now - obj["LastModified"].timestamp()))
            if not resp.get("IsTruncated"):
                return out
            token = resp["NextContinuationToken"]

    def clean_tmp(self, older_than_s: float) -> None:
        for part in self._tmp.glob("*.part"):
            if time.time() - part.stat().st_mtime > older_than_s:
                part.unlink(missing_ok=True)


def _brief(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def open_blob_store(location: str | None, library_dir: Path | None, cache_dir: Path):
    """``s3://...`` -> :class:`S3BlobStore`; None -> the library directory's own ``blobs/``."""
    if location is None:
        if library_dir is None:
            raise ValueError("a PostgreSQL catalog needs a shared blob store: blobs='s3://bucket/prefix'")
        return LocalBlobStore(library_dir)
    if location.startswith("s3://"):
        return S3BlobStore(location, cache_dir)
    raise ValueError(f"blob store URL must look like s3://bucket/prefix, got {location!r}")


def _abandoned(part: Path, older_than_s: float) -> bool:
    """A ``tmp/<pid>-<ns>.part`` file whose writer is gone (no such process) or that is old."""
    try:
        if time.time() - part.stat().st_mtime > older_than_s:
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
