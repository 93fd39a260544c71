"""The one place the version lives: pyproject.toml reads it (dynamic version), the package exports it."""

__version__ = "0.1.0"
