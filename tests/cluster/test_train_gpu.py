"""The training strategies on one CUDA device: a bf16, channels_last step of each, through a real nccl group.

With one GPU the world is one process, so DDP's strategy does not wrap the model (nothing to reduce):
its case checks the bf16 autocast and channels_last path; DeepSpeed's runs its ZeRO-2 engine, whose
reductions go through nccl even alone. `tests/jobs/test_gpu_job.py` runs a whole Ray Train job on a GPU.
"""

import pytest
import torch
import torch.distributed as dist

import effnet
from cluster.data.loader import Batch
from cluster.train.config import TrainingSpec
from cluster.train.loop import weighted_loss
from cluster.train.strategy import DDP, DeepSpeed
from infra.stack import StackPorts
from tests.effnet.helpers import as_if_trained

pytestmark = pytest.mark.gpu
STEP_LR = 0.05  # Adam's first step moves a weight by about the LR: enough to show in bf16 (2^-7 apart near 1)


@pytest.fixture
def nccl_group(monkeypatch: pytest.MonkeyPatch):
    """A one-process nccl group: the collectives are real, the world is just small."""
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(StackPorts.free().mlflow), "RANK": "0",
                        "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)  # gone again after the test
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    yield torch.device("cuda", 0)
    dist.destroy_process_group()


def _spec(strategy: dict) -> TrainingSpec:
    return TrainingSpec.model_validate({
        "name": "gpu", "data": {"train": {"manifest": "s3://shards/x/manifest.json"}, "batch_size": 8},
        "strategy": strategy, "precision": {"dtype": "bf16", "channels_last": True},
        "scaling": {"num_workers": 1, "use_gpu": True}, "optim": {"grad_clip_norm": 1.0},
    })


def _batch(device: torch.device) -> Batch:
    images = torch.randn(8, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (8,), device=device)
    weights = torch.tensor([1.0] * 7 + [0.0], device=device)
    return Batch(images, labels, weights, tuple(str(i) for i in range(8)), ())


@pytest.mark.parametrize("strategy", [{"name": "ddp"}, {"name": "deepspeed", "zero_stage": 2}], ids=["ddp", "zero2"])
def test_one_bf16_channels_last_step_on_cuda_moves_every_weight(nccl_group: torch.device, strategy: dict) -> None:
    spec = _spec(strategy)
    model = as_if_trained(effnet.build("efficientnet_b0", num_classes=10)).to(nccl_group)
    train = (DeepSpeed if strategy["name"] == "deepspeed" else DDP)(model, spec, nccl_group)
    before = [p.detach().float().clone() for p in train.module.parameters()]
    loss = train.micro_step(_batch(nccl_group), lambda logits, batch: weighted_loss(logits, batch, 0.1), sync=True)
    train.optimizer_step(lr=STEP_LR)
    torch.cuda.synchronize()
    assert torch.isfinite(loss)
    moved = [not torch.equal(p.detach().float(), b) for p, b in zip(train.module.parameters(), before, strict=True)]
    assert sum(moved) == len(moved), f"{len(moved) - sum(moved)} of {len(moved)} weights did not move"
    if strategy["name"] == "ddp":
        assert train.module.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    else:
        assert next(train.module.parameters()).dtype == torch.bfloat16  # DeepSpeed runs the model in bf16
