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

from effnet.model import EfficientNet, build
from effnet.specs import EfficientNetSpec, get_spec

CHECKPOINT_FORMAT = "compound.effnet/1"
StateDict = dict[str, torch.Tensor]
CLASSIFIER_WEIGHT = "classifier.weight"  # (num_classes, features) in our layout, whatever the source


class WeightsMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


class NumClassesMismatchError(WeightsMismatchError):
    """The weights file's classifier has `in_file` classes but a model with `asked` classes was wanted.

    `compound` tells a compound checkpoint (which knows its own head) from a reference state dict;
    the fields let a caller such as the CLI phrase the fix in its own terms (flags, not arguments).
    """

    def __init__(self, path: Path, *, in_file: int, asked: int, compound: bool) -> None:
        self.path, self.in_file, self.asked, self.compound = path, in_file, asked, compound
        if compound:
            fix = f"leave num_classes out to use the checkpoint's, or pass num_classes={in_file}"
        else:
            fix = f"pass num_classes={in_file}, or load_reference_weights(..., new_head=True) for a new head"
        super().__init__(f"{path} holds a classifier for {in_file} classes, not the {asked} asked for; {fix}")


def read_state_dict(path: str | Path) -> StateDict:
    """A state dict from a safetensors file or a `torch.save`d one (read with weights_only).

    The format is told by content, not by suffix: `.pth`, `.pt`, `.bin` and `.safetensors` are
    all used for both in the wild.
    """
    path = _existing(path)
    if _safetensors_metadata(path) is not None:
        return safetensors.torch.load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load on foreign bytes raises anything from EOFError to KeyError
        raise ValueError(
            f"{path} is neither a safetensors file nor a torch.save file that weights_only can read ({error}); "
            "pass an EfficientNet state dict or a compound checkpoint"
        ) from error
    if isinstance(state, Mapping):
        for wrapper in ("state_dict", "model"):  # training scripts often nest the weights
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
        return dict(state)
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict; pass an EfficientNet state dict")


def is_compound_checkpoint(path: str | Path) -> bool:
    """Whether `path` was written by `save_checkpoint`, judged by its metadata, not its suffix."""
    metadata = _safetensors_metadata(_existing(path))
    return metadata is not None and metadata.get("format") == CHECKPOINT_FORMAT


def load_weights(path: str | Path, variant: str, *, num_classes: int | None = None) -> EfficientNet:
    """`variant` with the weights in `path`, in any format we accept, told apart by content.

    - A compound checkpoint (`save_checkpoint`) rebuilds its own model from the spec it carries:
      it must hold `variant`, and `num_classes`, if given, must be the checkpoint's.
    - Anything else is a torchvision or timm state dict (safetensors, or torch.save as `.pth`,
      `.pt`, `.bin`) loaded into `build(variant, num_classes=...)`, 1000 classes by default; a
      classifier of another size raises naming the file's number of classes.
    """
    path = _existing(path)
    get_spec(variant)  # an unknown variant raises listing the valid ones before any file is read
    if is_compound_checkpoint(path):
        model = load_checkpoint(path)
        spec = model.spec
        if spec.name != variant:
            raise WeightsMismatchError(
                f"{path} is a compound checkpoint of {spec.name}, not {variant}; ask for {spec.name} instead"
            )
        if num_classes is not None and num_classes != spec.num_classes:
            raise NumClassesMismatchError(path, in_file=spec.num_classes, asked=num_classes, compound=True)
        return model
    model = build(variant) if num_classes is None else build(variant, num_classes=num_classes)
    state = _translated(read_state_dict(path))
    classifier = state.get(CLASSIFIER_WEIGHT)
    if classifier is not None and classifier.ndim == 2 and classifier.shape[0] != model.spec.num_classes:
        raise NumClassesMismatchError(path, in_file=classifier.shape[0], asked=model.spec.num_classes, compound=False)
    _check_fits(model, state, source=str(path))
    model.load_state_dict(state)
    return model


def load_reference_weights(model: EfficientNet, path: str | Path, *, new_head: bool = False) -> EfficientNet:
    """Load a torchvision or timm EfficientNet state dict from a local file into `model`.

    With `new_head=True` the checkpoint's classifier is dropped and the model keeps its own
    (freshly initialised) head for its `num_classes`: the usual start of transfer learning.
    A checkpoint that does not fit raises naming the missing, unexpected and mis-shaped keys.
    """
    state = _translated(read_state_dict(path))
    if new_head:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    _check_fits(model, state, source=str(path), ignore_prefix="classifier." if new_head else None)
    model.load_state_dict(state, strict=not new_head)
    return model


def save_checkpoint(model: EfficientNet, path: str | Path, *, state: StateDict | None = None) -> Path:
    """Save weights with the full spec in the file's metadata, so the file alone rebuilds the model.

    `state` replaces the model's own state dict, e.g. weights gathered from ZeRO-3 shards.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": CHECKPOINT_FORMAT, "spec": json.dumps(dataclasses.asdict(model.spec))}
    state = {k: v.detach().contiguous() for k, v in (state if state is not None else model.state_dict()).items()}
    safetensors.torch.save_file(state, path, metadata=metadata)
    return path


def load_checkpoint(path: str | Path) -> EfficientNet:
    """Rebuild a model saved by `save_checkpoint`."""
    path = _existing(path)
    metadata = _safetensors_metadata(path)
    if metadata is None or metadata.get("format") != CHECKPOINT_FORMAT:
        found = "not a safetensors file" if metadata is None else f"format {metadata.get('format')!r}"
        raise WeightsMismatchError(
            f"{path} is not a compound checkpoint ({found}); "
            "for torchvision or timm weights use load_weights() or load_reference_weights()"
        )
    model = EfficientNet(EfficientNetSpec(**json.loads(metadata["spec"])))
    state = safetensors.torch.load_file(path)
    _check_fits(model, state, source=str(path))
    model.load_state_dict(state)
    return model


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    return path


def _safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The file's safetensors metadata ({} when it has none), or None when it is not safetensors at all."""
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except safetensors.SafetensorError:  # e.g. a torch.save zip: its first 8 bytes are no header length
        return None


def _translated(state: StateDict) -> StateDict:
    """`state` with its keys in our layout, whichever of torchvision's, timm's or ours it came in."""
    translate = _translator(state)
    return {translate(key): value for key, value in state.items()}


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
