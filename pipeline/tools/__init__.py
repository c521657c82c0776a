"""Commands a user runs by hand, never part of the DVC graph: download, upload, validate, the MLflow UI."""
