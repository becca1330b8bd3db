"""Blobs as the catalog references them: the one atomic write path (blob first, then the row),
reads verified against the hash, and deletion once no row references a blob (mixed into
:class:`quiver.library.Library`; the stores themselves are :mod:`quiver.library.blobs`).
"""

from __future__ import annotations

from .blobs import BlobMissingError, BlobStoreError, sha256
from .errors import AdapterNotFoundError, CorruptBlobError

# How often a read follows a row that was replaced under it before giving up (each follow means
# another machine committed a new version between two reads of the row).
_MAX_REREADS = 8


class BlobRefsMixin:
    """The blob-handling methods of :class:`quiver.library.Library`."""

    def _commit_blob(self, data: bytes, write_row):
        """Store ``data`` as a blob and reference it: the one atomic write path.

        Under the blob's lock: the blob is put durably, then ``write_row(digest)`` runs in one
        transaction; it returns ``(result, replaced_blob_or_None)``. If it raises, the blob is
        deleted again unless something references it. A replaced blob is deleted afterwards if
        nothing references it any more.
        """
        digest = sha256(data)
        with self._catalog.blob_lock(digest):
            self._blobs.put(digest, data)
            try:
                with self._write():
                    result, replaced = write_row(digest)
            except BaseException:
                try:  # a refused write (e.g. a name another writer took first) leaves no blob behind
                    self._drop_blob_if_unused(digest)
                except Exception:  # noqa: BLE001 -- then verify finds the orphan; the first error is the one to see
                    pass
                raise
        if replaced is not None and replaced != digest:
            self._drop_blob_if_unused(replaced)
        return result

    def _read_blob(self, digest: str, name: str, current=None) -> bytes:
        """The verified bytes of blob ``digest``, which the catalog row of ``name`` referenced.

        Readers take no lock, so another machine may replace or remove the row and delete its
        blob between this reader's row read and its fetch. ``current()`` (when given) re-reads
        the row's digest: a missing blob whose row now points elsewhere is read from there, and
        one whose row is gone raises :class:`AdapterNotFoundError`, as if the row had been read
        a moment later. Only a blob the row still references and the store lacks is corrupt.
        """
        for _ in range(_MAX_REREADS):
            try:
                data = self._blobs.get(digest)
            except BlobMissingError:
                now = current() if current is not None else digest
                if now is None:
                    raise AdapterNotFoundError(f"adapter {name!r} was removed or renamed while "
                                               "it was being read") from None
                if now != digest:
                    digest = now  # replaced meanwhile: read the new version
                    continue
                raise CorruptBlobError(f"adapter {name!r}: blob {digest[:12]} is missing "
                                       f"from {self._blobs.location}") from None
            except BlobStoreError as e:
                raise CorruptBlobError(f"adapter {name!r}: {e}") from None
            if sha256(data) != digest:
                raise CorruptBlobError(f"adapter {name!r}: blob {digest[:12]} is damaged (hash mismatch) "
                                       f"in {self._blobs.location}")
            return data
        raise CorruptBlobError(f"adapter {name!r} was replaced {_MAX_REREADS} times while it was being read; "
                               "try again")

    def _drop_blob_if_unused(self, digest: str) -> bool:
        """Delete a blob and its derived data if no row references it; True if deleted."""
        with self._catalog.blob_lock(digest):
            with self._write():
                used = self._catalog.one("SELECT 1 AS x FROM adapters WHERE blob=? UNION ALL "
                                         "SELECT 1 AS x FROM artifacts WHERE blob=? LIMIT 1", (digest, digest))
                if used:
                    return False
                self._catalog.execute("DELETE FROM derived WHERE blob=?", (digest,))
            self._blobs.delete(digest)
        return True
