"""The package version (kept apart so every layer can read it without importing the package front)."""

__version__ = "0.1.0"
