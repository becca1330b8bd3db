"""Quiver: adapter composition and routing runtime for modular LLMs."""
__version__ = "0.1.0"
