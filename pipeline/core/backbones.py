"""Backbone registry and frozen feature extractors, shared by the fisheries and cats-vs-dogs pipelines.

Every model built here carries its own preprocessing: it takes raw RGB images (0-255, any float or uint8
dtype) at the configured size and applies the backbone's `preprocess_input` inside the graph, so a saved
`.keras` file predicts from raw pixels. The backbone is called with `training=False`, which keeps its
BatchNormalization layers in inference mode even when its top blocks are unfrozen for fine-tuning: letting
them update on small fine-tuning batches wrecks the pretrained statistics.

`weights` is `imagenet` (Keras' cache in `$KERAS_HOME/models/`, downloaded when online), `none` (random
initialisation: the offline demo) or the path of a weights file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import keras
import numpy as np
from keras import layers

from pipeline.core.devices import dtype_policy, predict


@dataclass(frozen=True)
class Backbone:
    """What the rest of the code needs to know about one `keras.applications` model."""

    name: str
    app: str  # constructor in keras.applications
    module: str  # keras.applications submodule holding its preprocess_input ("" when the model has its own)
    default_size: int
    min_size: int
    weights_file: str  # Keras' file name for the ImageNet weights without the top, in $KERAS_HOME/models/
    blocks: tuple[str, ...]  # layer-name prefixes of its blocks, deepest first, unfrozen in that order
    # Whether bfloat16 speeds its forward pass on a CPU with native bfloat16 (AVX512-BF16, 96 px, `extract_features`,
    # bench `bf16_extract_speedup`: VGG16 1.95x, ResNet50 1.44x, Xception 1.40x; EfficientNetV2B0 1.2x, and
    # ConvNeXt 0.65x, whose LayerNorms and 7x7 depthwise convolutions have no fast bfloat16 kernel there).
    cpu_bfloat16: bool = True

    def build(self, **kwargs) -> keras.Model:
        if not self.module:  # EfficientNetV2 and ConvNeXt rescale and normalise inside the model
            kwargs["include_preprocessing"] = True
        return getattr(keras.applications, self.app)(**kwargs)

    def preprocess(self, x):
        if not self.module:
            return x
        return getattr(keras.applications, self.module).preprocess_input(x)


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            "vgg16",
            "VGG16",
            "vgg16",
            224,
            32,
            "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            ("block5", "block4", "block3", "block2", "block1"),
        ),
        Backbone(
            "resnet50",
            "ResNet50",
            "resnet50",
            224,
            32,
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            ("conv5", "conv4", "conv3", "conv2"),
        ),
        Backbone(
            "xception",
            "Xception",
            "xception",
            299,
            71,
            "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
            ("block14", "block13", "block12", "block11", "block10", "block9", "block8", "block7"),
        ),
        Backbone(
            "efficientnetv2b0",
            "EfficientNetV2B0",
            "",
            224,
            32,
            "efficientnetv2-b0_notop.h5",
            ("top", "block6", "block5", "block4", "block3"),
        ),
        Backbone(
            "convnext_tiny",
            "ConvNeXtTiny",
            "",
            224,
            32,
            "convnext_tiny_notop.h5",
            ("convnext_tiny_stage_3", "convnext_tiny_stage_2", "convnext_tiny_stage_1"),
            cpu_bfloat16=False,
        ),
    )
}


class WeightsUnavailable(RuntimeError):
    """ImageNet weights were asked for but are neither cached nor downloadable."""


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid backbones are {sorted(BACKBONES)}")
    return BACKBONES[name]


def keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def validate_model_settings(backbones: tuple[str, ...] | list[str], image_size: int, weights: str) -> None:
    """Fail at start-up, not mid-run, on an unknown backbone, a too-small size or a missing weights file."""
    for name in backbones:
        bb = get_backbone(name)
        if image_size < bb.min_size:
            raise ValueError(f"{name} needs images of at least {bb.min_size} px; model.image_size is {image_size}")
    if weights not in ("imagenet", "none") and not Path(weights).exists():
        raise FileNotFoundError(
            f"model.weights is {weights!r}, which is neither 'imagenet', 'none' nor an existing weights file"
        )


def _resolve_weights(bb: Backbone, weights: str) -> str | None:
    if weights == "none":
        return None
    if weights != "imagenet":
        return weights
    cached = keras_cache_dir() / bb.weights_file
    if cached.exists():
        return "imagenet"
    # Not cached: let Keras try to download it, and turn an offline failure into a useful message.
    try:
        bb.build(include_top=False, weights="imagenet", input_shape=(bb.default_size, bb.default_size, 3))
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        raise WeightsUnavailable(
            f"ImageNet weights for {bb.name} are not cached and could not be downloaded ({type(exc).__name__}).\n"
            f"  missing file: {cached}\n"
            f"  fix: on a machine with internet run\n"
            f'    python -c "import keras; keras.applications.{bb.app}(include_top=False)"\n'
            f"  and copy ~/.keras/models/{bb.weights_file} into {cached.parent}/ (set $KERAS_HOME to use another\n"
            f"  folder), or set model.weights: none in params.yaml to train from random initialisation."
        ) from exc
    return "imagenet"


@keras.saving.register_keras_serializable(package="fishpipe")
class BackbonePreprocess(layers.Layer):
    """The backbone's own `preprocess_input`, as a serialisable layer so saved models take raw pixels."""

    def __init__(self, backbone: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.backbone = backbone

    def call(self, inputs):
        return get_backbone(self.backbone).preprocess(keras.ops.cast(inputs, "float32"))

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone}


def extraction_precision(setting: str, backbone: str, gpus: int, native_bfloat16: bool, policy: str) -> str | None:
    """The Keras dtype policy the frozen extractor computes in (`train.extract_precision`), or None for the global
    `policy` that `train.mixed_precision` set.

    auto: bfloat16 where nothing else decides and it pays: no GPU (there mixed_precision's float16 rules), a CPU
    with native bfloat16 (`devices.native_bfloat16`) and a backbone it speeds up (`Backbone.cpu_bfloat16`).
    Embeddings only: a frozen forward pass loses nothing a head can use to bfloat16's 8-bit mantissa, while the
    heads and fine-tuning, which train, keep the global policy."""
    if setting == "bfloat16":
        return "mixed_bfloat16"
    if setting == "float32":
        return "float32"
    if not gpus and native_bfloat16 and get_backbone(backbone).cpu_bfloat16 and policy == "float32":
        return "mixed_bfloat16"
    return None


def build_extractor(name: str, image_size: int, weights: str = "none", pooling: str = "avg",
                    precision: str | None = None) -> keras.Model:
    """Raw RGB images (image_size², 0-255) → pooled backbone features (float32). The backbone is frozen.

    `precision`: the dtype policy it computes in (`mixed_bfloat16`, ...); None: Keras' global policy. The weights
    are float32 under every policy, so the same seed builds the same weights."""
    bb = get_backbone(name)
    if image_size < bb.min_size:
        raise ValueError(f"{name} needs images of at least {bb.min_size} px, got {image_size}")
    with dtype_policy(precision):
        base = bb.build(include_top=False, weights=_resolve_weights(bb, weights),
                        input_shape=(image_size, image_size, 3))
        base.trainable = False
        inputs = keras.Input((image_size, image_size, 3), name="image")
        x = BackbonePreprocess(name, name="preprocess")(inputs)
        x = base(x, training=False)
        pool = layers.GlobalAveragePooling2D if pooling == "avg" else layers.GlobalMaxPooling2D
        # Pooled in float32 whatever the backbone computed in: the mean of a 16-bit map, and the features, keep
        # float32's precision.
        outputs = pool(name="pool", dtype="float32")(x)
        return keras.Model(inputs, outputs, name=f"{name}_extractor")


class Progress(Protocol):
    """What `extract_features` reports to: a tqdm bar, for one."""

    def update(self, n: int) -> object: ...


def extract_features(
    extractor: keras.Model, images: np.ndarray, batch_size: int = 32, chunk: int = 1024,
    progress: Progress | None = None,
) -> np.ndarray:
    """Run a frozen extractor over `images` (possibly a memory map) in chunks; returns float32 features.

    Chunks bound the memory a memory-mapped array pulls in at once; within a chunk `predict` batches.
    """
    out = np.empty((len(images), extractor.output_shape[-1]), dtype=np.float32)
    for start in range(0, len(images), chunk):
        batch = np.asarray(images[start : start + chunk])
        out[start : start + len(batch)] = predict(extractor, batch, batch_size)
        if progress is not None:
            progress.update(len(batch))
    return out


def build_classifier(extractor: keras.Model, head: keras.Model) -> keras.Model:
    """Extractor and head joined into one model that predicts class probabilities from raw images."""
    inputs = keras.Input(extractor.input_shape[1:], name="image")
    return keras.Model(inputs, head(extractor(inputs)), name=f"{extractor.name.removesuffix('_extractor')}_classifier")


def unfreeze_top(extractor: keras.Model, backbone: str, n_blocks: int) -> list[str]:
    """Make the deepest `n_blocks` blocks of the backbone trainable (BatchNorm layers stay frozen)."""
    bb = get_backbone(backbone)
    prefixes = bb.blocks[:n_blocks]
    base = next(layer for layer in extractor.layers if isinstance(layer, keras.Model))
    base.trainable = True
    unfrozen = []
    for layer in base.layers:
        train_it = layer.name.startswith(prefixes) and not isinstance(layer, layers.BatchNormalization)
        layer.trainable = train_it
        if train_it:
            unfrozen.append(layer.name)
    return unfrozen
