"""The network a job trains, built from its model section: an EfficientNet, or a torchvision classifier."""

from __future__ import annotations

import logging

import torchvision
from torch import nn

import effnet
from cluster.train.config import ModelSpec
from effnet.weights import load_reference_weights, read_state_dict

log = logging.getLogger(__name__)

# Where each layout keeps its classifier's weight: compound and timm, torchvision's EfficientNet.
_EFFNET_CLASSIFIER_KEYS = ("classifier.weight", "classifier.1.weight")


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly built model for `spec` (a resolved model section: num_classes is known)."""
    assert spec.num_classes is not None, "resolve the spec against its dataset first"
    if spec.is_efficientnet:
        return _build_efficientnet(spec)
    return _build_torchvision(spec)


def _build_efficientnet(spec: ModelSpec) -> effnet.EfficientNet:
    model = effnet.build(spec.arch, num_classes=spec.num_classes, dropout=spec.dropout,
                         drop_path_rate=spec.drop_path_rate, bn_momentum=spec.bn_momentum)
    if spec.pretrained is not None:
        state = read_state_dict(spec.pretrained)
        weights = next((state[k] for k in _EFFNET_CLASSIFIER_KEYS if k in state), None)
        new_head = weights is None or weights.shape[0] != spec.num_classes
        if new_head:
            log.info("a new %d-class head on the weights of %s", spec.num_classes, spec.pretrained)
        load_reference_weights(model, spec.pretrained, new_head=new_head)
    if spec.freeze_through_stage is not None:
        model.freeze(spec.freeze_through_stage)
    if spec.activation_checkpointing:
        model.set_activation_checkpointing(True)
    return model


def _build_torchvision(spec: ModelSpec) -> nn.Module:
    model = torchvision.models.get_model(spec.arch, weights=None, num_classes=spec.num_classes)
    if spec.pretrained is not None:
        _load_torchvision_weights(model, spec.pretrained, spec.arch)
    return model


def _load_torchvision_weights(model: nn.Module, path: str, arch: str) -> None:
    """Load a torchvision state dict; a classifier for another number of classes is left freshly initialised."""
    state = read_state_dict(path)
    head = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]
    expected = model.state_dict()
    head_keys = {f"{head}.weight", f"{head}.bias"}
    if any(k in state and state[k].shape != expected[k].shape for k in head_keys):
        log.info("a new %d-class head on the weights of %s", expected[f"{head}.weight"].shape[0], path)
        state = {k: v for k, v in state.items() if k not in head_keys}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head_keys]
    mismatched = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path} does not hold {arch} weights: {len(missing)} missing keys ({', '.join(missing[:3])}), "
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}); pass a torchvision {arch} state dict"
        )


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: weight decay on weights, none on norms and biases (1-D tensors)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
