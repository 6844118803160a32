"""robustmatrix's harness: registries, data, model zoo, matrix runner, result store, CLI."""

__version__ = "0.1.0"
