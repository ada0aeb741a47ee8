"""The package version: one place, read by the package, the CLI, the report and pyproject.toml."""

__version__ = "0.1.0"
