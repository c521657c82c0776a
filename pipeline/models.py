"""Where Keras files saved before the package was split into layers find `BackbonePreprocess`.

A fine-tuned fold classifier or a logged extractor records the module of its custom layer
(`pipeline.models`); the layer now lives in `pipeline.core.backbones`. Nothing in the package imports this.
"""

from pipeline.core.backbones import BackbonePreprocess

__all__ = ["BackbonePreprocess"]
