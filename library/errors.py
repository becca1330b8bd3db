"""Exceptions raised by the library. Every message names the offending item."""


class QuiverError(Exception):
    """Base class for Quiver's own errors."""


class AdapterFormatError(QuiverError, ValueError):
    """An adapter's files or bytes cannot be read: corrupt, truncated or malformed."""


class UnsupportedAdapterError(AdapterFormatError):
    """A well-formed adapter of a kind Quiver does not handle (DoRA, embeddings, non-LoRA)."""


class ValidationError(QuiverError, ValueError):
    """An adapter does not fit the library's base model, or its values are invalid."""


class AdapterNotFoundError(QuiverError, LookupError):
    """No adapter of that name in the library."""


class DuplicateNameError(QuiverError, ValueError):
    """An adapter of that name already exists."""


class CorruptBlobError(QuiverError):
    """A stored blob's bytes no longer match the hash it was stored under."""


class CatalogError(QuiverError):
    """A library's catalog is empty, truncated, damaged, unreachable or of an unknown schema
    (the message says how to recover)."""


class ReadOnlyLibraryError(QuiverError):
    """A write was asked of a library opened from a read-only location."""
