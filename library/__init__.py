"""The adapter library: data model, persisted store, embeddings, search, PEFT interop."""

from .adapter import BaseModelRef, LoraAdapter, LoraModule, check_name
from .base_model import DEFAULT_MODEL, BaseModelSpec, base_model_dir, fingerprint, load_base_model
from .blobs import BlobStoreError
from .errors import (
    AdapterFormatError,
    AdapterNotFoundError,
    CatalogError,
    CorruptBlobError,
    DuplicateNameError,
    QuiverError,
    ReadOnlyLibraryError,
    UnsupportedAdapterError,
    ValidationError,
)
from .index import IndexConfig, VectorIndex
from .peft_io import read_peft_dir, write_peft_dir
from .records import AdapterRecord, EmbeddingConfig, VerifyReport
from .store import Library

__all__ = [
    "AdapterFormatError", "AdapterNotFoundError", "AdapterRecord", "BaseModelRef", "BaseModelSpec",
    "BlobStoreError", "CatalogError", "CorruptBlobError", "DEFAULT_MODEL", "DuplicateNameError", "EmbeddingConfig", "IndexConfig",
    "Library", "LoraAdapter", "LoraModule", "QuiverError", "ReadOnlyLibraryError", "UnsupportedAdapterError",
    "ValidationError", "VectorIndex", "VerifyReport", "base_model_dir", "check_name", "fingerprint",
    "load_base_model", "read_peft_dir", "write_peft_dir",
]
