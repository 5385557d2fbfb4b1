"""The EfficientNet network, built from an `EfficientNetSpec`."""

from __future__ import annotations

import contextlib
import dataclasses
from types import TracebackType

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from effnet.blocks import MBConv
from effnet.layers import ConvBnAct, _is_tracing, spatial_mean
from effnet.specs import B0_STAGES, HEAD_CHANNELS, IMAGE_CHANNELS, STEM_CHANNELS, EfficientNetSpec, get_spec

STEM_STRIDE = 2
FEATURE_STRIDES = (4, 8, 16, 32)  # the pyramid levels a detection neck consumes


class EfficientNet(nn.Module):
    """stem → 7 stages of MBConv blocks → 1x1 head conv → pool → dropout → linear.

    Layout: `stem`, `stages[i][j]` (MBConv), `head`, `classifier`.
    `set_activation_checkpointing()` trades training compute for activation memory, stage by stage.
    """

    def __init__(self, spec: EfficientNetSpec) -> None:
        super().__init__()
        self.spec = spec
        stem_channels = spec.channels(STEM_CHANNELS)
        self.stem = ConvBnAct(IMAGE_CHANNELS, stem_channels, 3, stride=STEM_STRIDE, spec=spec)

        # Stochastic depth grows linearly from 0 at the first block to just under the rate at the last.
        total_blocks = sum(spec.repeats(stage.repeats) for stage in B0_STAGES)
        stages, stage_strides = [], []
        in_channels, stride, block_index = stem_channels, STEM_STRIDE, 0
        for stage in B0_STAGES:
            out_channels = spec.channels(stage.out_channels)
            blocks = []
            for repeat in range(spec.repeats(stage.repeats)):
                blocks.append(MBConv(
                    in_channels, out_channels, expand_ratio=stage.expand_ratio, kernel_size=stage.kernel_size,
                    stride=stage.stride if repeat == 0 else 1,
                    drop_path_rate=spec.drop_path_rate * block_index / total_blocks, spec=spec,
                ))
                in_channels, block_index = out_channels, block_index + 1
            stride *= stage.stride
            stages.append(nn.Sequential(*blocks))
            stage_strides.append(stride)
        self.stages = nn.ModuleList(stages)
        # The last stage at each stride is the one whose output a feature pyramid taps.
        self.feature_stages = {s: max(i for i, st in enumerate(stage_strides) if st == s) for s in FEATURE_STRIDES}
        self.feature_channels = {s: spec.channels(B0_STAGES[i].out_channels) for s, i in self.feature_stages.items()}

        self.num_features = spec.channels(HEAD_CHANNELS)
        self.head = ConvBnAct(in_channels, self.num_features, 1, spec=spec)
        self.dropout = nn.Dropout(spec.dropout)
        self.classifier = nn.Linear(self.num_features, spec.num_classes)
        self.frozen_through = -2  # no stage frozen (-1 would be the stem alone)
        self.activation_checkpointing = False  # a plain attribute: the state dict does not change
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images → (N, num_features, H/32, W/32) head feature map."""
        x = self.stem(x)
        for stage in self.stages:
            x = self._run_stage(stage, x)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images → (N, num_classes) logits."""
        x = spatial_mean(self.forward_features(x))
        return self.classifier(self.dropout(x))

    def feature_maps(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Multi-scale features for a detection backbone: {stride: (N, C, H/stride, W/stride)}."""
        taps = {i: s for s, i in self.feature_stages.items()}
        maps = {}
        x = self.stem(x)
        for index, stage in enumerate(self.stages[: max(taps) + 1]):
            x = self._run_stage(stage, x)
            if index in taps:
                maps[taps[index]] = x
        return maps

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Keep only each stage's input for backward and recompute the stage's activations when its
        gradient is needed (non-reentrant `torch.utils.checkpoint`, one checkpoint per MBConv stage).

        The activations held at once drop to the stage inputs plus the largest stage's, for one
        more forward pass of the stages (B7 at 128 px, batch 16, CPU: peak step memory 0.53x, step
        time 1.19x; `tests/benchmarks/bench_activation_checkpointing.py`). It applies only where a backward will follow
        (train mode, grad enabled, eager, a stage with something to train); inference,
        `torch.compile` and export run as before. Outputs, gradients and BatchNorm statistics equal
        those without it: the recomputation replays the forward's random state (the same
        stochastic-depth masks) and does not update BatchNorm's running statistics a second time.
        """
        if not isinstance(enabled, bool):
            raise TypeError(f"set_activation_checkpointing(enabled=...) takes True or False, got {enabled!r}")
        self.activation_checkpointing = enabled

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self._should_checkpoint(stage, x):
            return stage(x)
        # Backward keeps only x, the stage input (N, C_in, H/s, W/s), and reruns the stage when its
        # gradient is needed; the forward's RNG state is restored first, so the stochastic-depth
        # masks drawn again are the same ones.
        return torch.utils.checkpoint.checkpoint(
            stage, x, use_reentrant=False, preserve_rng_state=True,
            context_fn=lambda: (contextlib.nullcontext(), _ScratchRunningStats(stage)),
        )

    def _should_checkpoint(self, stage: nn.Module, x: torch.Tensor) -> bool:
        # A frozen stage fed by a frozen stem builds no graph: there is nothing to save or recompute.
        return (
            self.activation_checkpointing and self.training and torch.is_grad_enabled() and not _is_tracing()
            and (x.requires_grad or any(p.requires_grad for p in stage.parameters()))
        )

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for `num_classes` (transfer learning)."""
        self.spec = dataclasses.replace(self.spec, num_classes=num_classes)
        self.classifier = nn.Linear(self.num_features, num_classes).to(self.classifier.weight.device)
        _init_weights(self.classifier)

    def freeze(self, through_stage: int) -> None:
        """Stop training the stem and stages 0..`through_stage` (-1: stem only).

        Frozen parts get no gradient and their BatchNorm statistics stay fixed in train mode.
        """
        if not -1 <= through_stage < len(self.stages):
            raise ValueError(f"through_stage must be in [-1, {len(self.stages) - 1}], got {through_stage}")
        self.frozen_through = through_stage
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> EfficientNet:
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_through < -1:
            return []
        return [self.stem, *self.stages[: self.frozen_through + 1]]


class _ScratchRunningStats:
    """While a checkpointed stage is recomputed in backward, its training-mode BatchNorms update
    throwaway copies of running_mean, running_var and num_batches_tracked: the forward pass has
    already updated the real buffers once for this batch, and a second update would count it twice.

    Swapping the buffers rather than switching tracking off keeps every BatchNorm (ours fused or
    not, `SyncBatchNorm`) running the same ops, so the recomputation saves the same tensors for
    backward as the forward did, which non-reentrant checkpointing requires. A class rather than
    a generator: a second backward through a retained graph enters the same object again.
    """

    BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.swapped: list[tuple[_BatchNorm, dict[str, torch.Tensor]]] = []

    def __enter__(self) -> None:
        for bn in self.module.modules():
            if isinstance(bn, _BatchNorm) and bn.training and bn.track_running_stats:
                real = {name: getattr(bn, name) for name in self.BUFFERS}
                self.swapped.append((bn, real))
                for name, buffer in real.items():
                    setattr(bn, name, buffer.clone())  # per-channel vectors: a few KB per layer

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Also runs when checkpoint ends the recomputation early by raising once it has what it needs.
        for bn, real in self.swapped:
            for name, buffer in real.items():
                setattr(bn, name, buffer)
        self.swapped = []


def _init_weights(module: nn.Module) -> None:
    """torchvision's initialisation for convolutions and BatchNorm, with two changes that make a fresh
    model start at chance and train from scratch (`tests/effnet/test_init.py` measures both):

    - The classifier starts at zero: every class equally likely, cross-entropy ln C. The reference's
      uniform(±1/√num_classes) was chosen for 1000 classes; on 10 it made a fresh B7's logits std 9
      (cross-entropy 12 at step 0, where chance is 2.3).
    - A residual block's last BatchNorm starts at zero scale, so each block starts as the identity
      (Goyal et al. 2017, torchvision's `zero_init_residual` for ResNets). Without it B7's 55
      blocks pile up through the residual stream and a short run from scratch stays at chance.

    `apply` visits children before their parent, so an MBConv's BatchNorm has its ones by then.
    Reference weights, when loaded, replace all of this.
    """
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.zeros_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, MBConv) and module.has_residual:
        nn.init.zeros_(module.project.bn.weight)


def build(name: str, **overrides: object) -> EfficientNet:
    """Build a variant by name, e.g. `build("efficientnet_b3", num_classes=10, padding="same")`.

    `overrides` are `EfficientNetSpec` fields (num_classes, dropout, drop_path_rate, padding,
    bn_eps, bn_momentum); an unknown name or field raises listing the valid ones.
    """
    spec = get_spec(name)
    fields = {f.name for f in dataclasses.fields(spec)} - {"name", "num_params", "width_mult", "depth_mult"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for build(); valid: {', '.join(sorted(fields))}")
    return EfficientNet(dataclasses.replace(spec, **overrides))
