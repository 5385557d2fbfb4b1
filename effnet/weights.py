"""Weights in and out: reference state dicts (torchvision, timm) and compound's own checkpoints.

Everything reads local files: nothing here downloads.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import safetensors.torch
import torch

from effnet.model import EfficientNet
from effnet.specs import EfficientNetSpec

CHECKPOINT_FORMAT = "compound.effnet/1"
StateDict = dict[str, torch.Tensor]


class WeightsMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


def read_state_dict(path: str | Path) -> StateDict:
    """A state dict from a `.safetensors` file or a `torch.save`d one (read with weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # training scripts often nest the weights
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    return dict(state)


def load_reference_weights(model: EfficientNet, path: str | Path, *, new_head: bool = False) -> EfficientNet:
    """Load a torchvision or timm EfficientNet state dict from a local file into `model`.

    With `new_head=True` the checkpoint's classifier is dropped and the model keeps its own
    (freshly initialised) head for its `num_classes`: the usual start of transfer learning.
    A checkpoint that does not fit raises naming the missing, unexpected and mis-shaped keys.
    """
    state = read_state_dict(path)
    translate = _translator(state)
    state = {translate(key): value for key, value in state.items()}
    if new_head:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    _check_fits(model, state, source=str(path), ignore_prefix="classifier." if new_head else None)
    model.load_state_dict(state, strict=not new_head)
    return model


def save_checkpoint(model: EfficientNet, path: str | Path) -> Path:
    """Save weights with the full spec in the file's metadata, so the file alone rebuilds the model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": CHECKPOINT_FORMAT, "spec": json.dumps(dataclasses.asdict(model.spec))}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, path, metadata=metadata)
    return path


def load_checkpoint(path: str | Path) -> EfficientNet:
    """Rebuild a model saved by `save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise WeightsMismatchError(
            f"{path} is not a compound checkpoint (format {metadata.get('format')!r}); "
            "for torchvision or timm weights use load_reference_weights()"
        )
    model = EfficientNet(EfficientNetSpec(**json.loads(metadata["spec"])))
    state = safetensors.torch.load_file(path)
    _check_fits(model, state, source=str(path))
    model.load_state_dict(state)
    return model


def _check_fits(model: EfficientNet, state: StateDict, *, source: str, ignore_prefix: str | None = None) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not (ignore_prefix and k.startswith(ignore_prefix))]
    unexpected = [k for k in state if k not in expected]
    misshapen = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if not (missing or unexpected or misshapen):
        return
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", misshapen))
        if keys
    ]
    hint = (
        "check that the checkpoint is the same variant as the model"
        f" ({model.spec.name}, {model.spec.num_classes} classes); for a different number of classes"
        " pass new_head=True"
    )
    raise WeightsMismatchError(f"weights in {source} do not fit {model.spec.name}: " + "; ".join(problems) + f". {hint}")


# --- key layouts --------------------------------------------------------------------------------

_CONV_BN = {"0": "conv", "1": "bn", "fc1": "reduce", "fc2": "expand"}
_TIMM_TOP = {"conv_stem": "stem.conv", "bn1": "stem.bn", "conv_head": "head.conv", "bn2": "head.bn"}
_TIMM_INVERTED_RESIDUAL = {
    "conv_pw": "expand.conv", "bn1": "expand.bn", "conv_dw": "depthwise.conv", "bn2": "depthwise.bn",
    "se.conv_reduce": "se.reduce", "se.conv_expand": "se.expand", "conv_pwl": "project.conv", "bn3": "project.bn",
}
_TIMM_DEPTHWISE_SEPARABLE = {  # timm's first-stage block: no expansion conv
    "conv_dw": "depthwise.conv", "bn1": "depthwise.bn", "se.conv_reduce": "se.reduce",
    "se.conv_expand": "se.expand", "conv_pw": "project.conv", "bn2": "project.bn",
}


def _translator(state: StateDict) -> Callable[[str], str]:
    """The key mapping for the layout `state` is in; keys it cannot place are returned unchanged."""
    if any(k.startswith("features.") for k in state):
        return lambda key: _torchvision_key(key, state)
    if any(k.startswith("conv_stem.") for k in state):
        return lambda key: _timm_key(key, state)
    return lambda key: key  # compound's own layout


def _torchvision_key(key: str, state: StateDict) -> str:
    # features.0 = stem, features.1-7 = stages, features.8 = head; classifier = [Dropout, Linear].
    if m := re.fullmatch(r"features\.(\d+)\.(\d+)\.block\.(\d+)\.(\w+)\.(.+)", key):
        feature, block, part, layer, rest = m.groups()
        has_expand = f"features.{feature}.{block}.block.3.0.weight" in state
        parts = ("expand", "depthwise", "se", "project") if has_expand else ("depthwise", "se", "project")
        if layer not in _CONV_BN or int(part) >= len(parts):
            return key
        return f"stages.{int(feature) - 1}.{block}.{parts[int(part)]}.{_CONV_BN[layer]}.{rest}"
    if m := re.fullmatch(r"features\.(\d+)\.([01])\.(.+)", key):
        feature, layer, rest = m.groups()
        return f"{'stem' if feature == '0' else 'head'}.{_CONV_BN[layer]}.{rest}"
    if m := re.fullmatch(r"classifier\.1\.(.+)", key):
        return f"classifier.{m.group(1)}"
    return key


def _timm_key(key: str, state: StateDict) -> str:
    if m := re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(se\.conv_\w+|\w+)\.(.+)", key):
        stage, block, layer, rest = m.groups()
        inverted = f"blocks.{stage}.{block}.conv_pwl.weight" in state
        names = _TIMM_INVERTED_RESIDUAL if inverted else _TIMM_DEPTHWISE_SEPARABLE
        return f"stages.{stage}.{block}.{names[layer]}.{rest}" if layer in names else key
    if m := re.fullmatch(r"(\w+)\.(.+)", key):
        layer, rest = m.groups()
        return f"{_TIMM_TOP[layer]}.{rest}" if layer in _TIMM_TOP else key
    return key
