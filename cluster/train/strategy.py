"""DDP or DeepSpeed behind one small interface: a micro-step (forward + backward), an optimiser step,
and saving or loading the model and optimiser state.

The loop owns gradient accumulation: it says which micro-step syncs (the last before an optimiser
step), so both strategies take the same steps. The learning rate is set before every optimiser
step from the pure schedule, so neither keeps a scheduler of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cluster.data.loader import Batch
from cluster.train.config import DeepSpeedStrategy, OptimSpec, TrainingSpec
from cluster.train.models import parameter_groups

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAINING_STATE_FILE = "training.pt"
DEEPSPEED_TAG = "deepspeed"
OPTIMIZER_SHARDS = "*_optim_states.pt"  # a DeepSpeed checkpoint's: one per data-parallel rank
ADAMW_EPS, RMSPROP_EPS = 1e-8, 1e-3  # RMSprop's as in the EfficientNet paper

LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]


def make_optimizer(model: nn.Module, optim: OptimSpec) -> torch.optim.Optimizer:
    """SGD and AdamW run fused (one kernel over every parameter, on CPU and CUDA) rather than a Python
    loop of small ops per parameter, which on CPU is the default: a B0's AdamW step takes 4 ms, not 13."""
    groups = parameter_groups(model, optim.weight_decay)
    if optim.optimizer == "sgd":
        nesterov = optim.nesterov and optim.momentum > 0  # Nesterov needs momentum to look ahead with
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=nesterov, fused=True)
    if optim.optimizer == "rmsprop":  # no fused kernel
        return torch.optim.RMSprop(groups, lr=optim.lr, alpha=optim.rmsprop_decay, momentum=optim.momentum,
                                   eps=optim.eps or RMSPROP_EPS)
    return torch.optim.AdamW(groups, lr=optim.lr, eps=optim.eps or ADAMW_EPS, fused=True)


class WeightEMA:
    """An exponential moving average of a model's weights, kept in fp32 whatever the model runs in."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(module).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        ema = list(self.module.parameters())
        torch._foreach_lerp_(ema, [p.detach().float() for p in module.parameters()], 1.0 - self.decay)
        for ema_buffer, buffer in zip(self.module.buffers(), module.buffers(), strict=True):
            ema_buffer.copy_(buffer)  # BatchNorm statistics follow the model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


class Strategy:
    """What the loop needs from DDP or DeepSpeed."""

    module: nn.Module  # the unwrapped model: evaluation, EMA and exported weights read it
    optimizer: torch.optim.Optimizer

    def micro_step(self, batch: Batch, loss_fn: LossFn, *, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; gradients are all-reduced only when `sync`."""
        raise NotImplementedError

    def optimizer_step(self, lr: float) -> None:
        raise NotImplementedError

    def autocast(self) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def save(self, directory: Path, *, rank: int) -> None:
        raise NotImplementedError

    def load(self, directory: Path) -> None:
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights (called on every rank; complete on rank 0)."""
        return self.module.state_dict()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr


class DDP(Strategy):
    """PyTorch DistributedDataParallel over the process group Ray Train set up (gloo or nccl)."""

    def __init__(self, module: nn.Module, spec: TrainingSpec, device: torch.device) -> None:
        if spec.precision.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module, self.device = module, device
        self.dtype = DTYPES[spec.precision.dtype]
        self.accumulation = spec.accumulation_at(_world_size())
        self.clip = spec.optim.grad_clip_norm
        distributed = _world_size() > 1
        # Gradients as views of DDP's buckets (laid out like the weights when DDP is built): no copy into them.
        self.model = (nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                                          gradient_as_bucket_view=True)
                      if distributed else module)
        self.optimizer = make_optimizer(module, spec.optim)
        self.scaler = torch.amp.GradScaler(device.type, enabled=spec.precision.dtype == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def micro_step(self, batch: Batch, loss_fn: LossFn, *, sync: bool) -> torch.Tensor:
        no_sync = self.model.no_sync if not sync and self.model is not self.module else contextlib.nullcontext
        with no_sync():
            with self.autocast():
                logits = self.model(batch.images)
            loss = loss_fn(logits.float(), batch)
            self.scaler.scale(loss / self.accumulation).backward()
        return loss.detach()

    def optimizer_step(self, lr: float) -> None:
        self.set_lr(lr)
        if self.clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=False)  # the gradients are DDP's bucket views: keep them

    def save(self, directory: Path, *, rank: int) -> None:
        if rank == 0:  # the replicas are identical
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict()}
            torch.save(state, directory / TRAINING_STATE_FILE)

    def load(self, directory: Path) -> None:
        state = torch.load(directory / TRAINING_STATE_FILE, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


def deepspeed_config(spec: TrainingSpec, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for a spec on `world_size` workers: generated from its sections, then the expert
    override merged in."""
    assert isinstance(spec.strategy, DeepSpeedStrategy)
    accumulation = spec.accumulation_at(world_size)
    generated = {
        "train_micro_batch_size_per_gpu": spec.data.batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": spec.data.batch_size * world_size * accumulation,
        # The loop decides which micro-step ends an accumulation (and flushes a partial one at the end of an
        # epoch), exactly as with DDP.
        "managed_gradient_accumulation": False,
        "zero_optimization": {"stage": spec.strategy.zero_stage},
        "gradient_clipping": spec.optim.grad_clip_norm or 0.0,
        "bf16": {"enabled": spec.precision.dtype == "bf16"},
        "fp16": {"enabled": spec.precision.dtype == "fp16"},
        # BatchNorm needs its running statistics in the parameters' dtype; DeepSpeed casts only parameters.
        **({"data_types": {"buffer_dtype": spec.precision.dtype}} if spec.precision.dtype != "fp32" else {}),
        "zero_allow_untested_optimizer": True,  # torch optimisers: nothing of DeepSpeed's to compile
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(generated, spec.strategy.config)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


class DeepSpeed(Strategy):
    """A DeepSpeed engine (ZeRO stage 1, 2 or 3) over Ray's process group, with a torch optimiser.

    The weights stay in the default memory format: DeepSpeed flattens parameters into contiguous
    buffers. Convolutions still run channels_last when the input is (the loop feeds it so).
    """

    def __init__(self, module: nn.Module, spec: TrainingSpec, device: torch.device) -> None:
        import deepspeed

        if device.type == "cpu":
            _skip_shared_memory_all_reduce()
        self.device = device
        self.dtype = DTYPES[spec.precision.dtype]
        self.accumulation = spec.accumulation_at(_world_size())
        self.config = deepspeed_config(spec, _world_size())
        if spec.strategy.zero_stage == 3:
            _declare_borrowed_parameters(module)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=make_optimizer(module, spec.optim), config=self.config,
            dist_init_required=False,
        )
        self.module = self.engine.module

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed runs the model in its own precision

    def micro_step(self, batch: Batch, loss_fn: LossFn, *, sync: bool) -> torch.Tensor:
        logits = self.engine(batch.images.to(self.dtype))
        loss = loss_fn(logits.float(), batch)
        self.engine.backward(loss / self.accumulation, scale_wrt_gas=False)
        return loss.detach()

    def optimizer_step(self, lr: float) -> None:
        self.set_lr(lr)
        self.engine.step()

    def save(self, directory: Path, *, rank: int) -> None:
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, save_latest=False)  # every rank its shard

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.engine.zero_optimization_partition_weights():  # ZeRO-3: each rank holds a shard
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                return {name: tensor.detach().clone() for name, tensor in self.module.state_dict().items()}
        return self.module.state_dict()

    def load(self, directory: Path) -> None:
        saved_world = len(list((directory / DEEPSPEED_TAG).glob(OPTIMIZER_SHARDS)))
        if saved_world in (0, _world_size()):
            self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                        load_lr_scheduler_states=False)
            return
        # An elastic job on another number of workers: DeepSpeed resumes optimiser shards only on as many ranks
        # as wrote them, but reads its universal checkpoint (each parameter's state whole) on any number.
        with tempfile.TemporaryDirectory(prefix="compound-universal-") as universal:
            _to_universal(directory / DEEPSPEED_TAG, Path(universal) / DEEPSPEED_TAG)
            self.engine._config.load_universal_checkpoint = True  # read only by load_checkpoint
            try:
                self.engine.load_checkpoint(universal, tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                            load_lr_scheduler_states=False)
            finally:
                self.engine._config.load_universal_checkpoint = False
        log.info("DeepSpeed state of %d workers resharded over %d", saved_world, _world_size())


def _to_universal(checkpoint: Path, universal: Path) -> None:
    """DeepSpeed's `ds_to_universal`, in this process (the cores this worker was given: no pool of its own).
    Without tensor or pipeline parallelism the checkpoint needs no layout notes of ours: DeepSpeed's own
    `inject_missing_state` adds the version record it asks for."""
    from deepspeed.checkpoint import ds_to_universal

    arguments = argparse.Namespace(input_folder=str(checkpoint), output_folder=str(universal), num_extract_workers=1,
                                   num_merge_workers=1, keep_temp_folder=False, strict=True,
                                   inject_missing_state=True)
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines
        ds_to_universal.main(arguments)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _declare_borrowed_parameters(module: nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters around its own forward and backward. A layer that uses a
    child's parameters without calling the child (the fused BatchNorm + swish, squeeze-excite's 1x1 convs
    run as matrix products) declares them: unless DeepSpeed knows them as that layer's, it can release
    them between forward and backward, and backward then finds a 0-element weight."""
    import deepspeed

    for layer in module.modules():
        for parameter in getattr(layer, "borrowed_parameters", list)():
            deepspeed.zero.register_external_parameter(layer, parameter)


def _skip_shared_memory_all_reduce() -> None:
    """DeepSpeed builds its shared-memory all-reduce op when its backend starts on a CPU node: a C++
    compile of about a minute on every fresh node (two cores here), for an op that only inference
    uses (training reduces through the process group). DeepSpeed keeps its op table editable for this;
    reading it probes every op, so GPU nodes (which have no such op) leave it alone."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def make_strategy(module: nn.Module, spec: TrainingSpec, device: torch.device) -> Strategy:
    if isinstance(spec.strategy, DeepSpeedStrategy):
        return DeepSpeed(module, spec, device)
    return DDP(module, spec, device)
