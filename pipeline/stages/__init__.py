"""The DVC stages: each module is one stage of dvc.yaml, with a `Settings`, a `run` and a short `main`."""
