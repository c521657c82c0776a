"""Where ensembles logged to MLflow before the package was split into layers import their model class from.

Their `ensemble_model.py` says `from pipeline.serving import EnsembleModel`; the class now lives in
`pipeline.core.serving`. Nothing in the package imports this module.
"""

from pipeline.core.serving import EnsembleModel

__all__ = ["EnsembleModel"]
