"""The EfficientNet family B0-B7: specs, scaling math, layers, blocks, model, weights, export.

Depends on torch only: nothing here knows about Ray, MLflow or S3.
"""

from effnet.model import FEATURE_STRIDES, EfficientNet, build
from effnet.specs import VARIANTS, EfficientNetSpec, get_spec, round_channels, round_repeats

__all__ = [
    "FEATURE_STRIDES",
    "VARIANTS",
    "EfficientNet",
    "EfficientNetSpec",
    "build",
    "get_spec",
    "round_channels",
    "round_repeats",
]
