"""Quiver: adapter composition and routing runtime for modular LLMs."""

from .library import Library, LoraAdapter, load_base_model
from .runtime import RoutedModel

__version__ = "0.1.0"
__all__ = ["Library", "LoraAdapter", "RoutedModel", "load_base_model"]
