"""The package version (its own module so that low layers such as the adapter format can record it)."""

__version__ = "0.1.0"
