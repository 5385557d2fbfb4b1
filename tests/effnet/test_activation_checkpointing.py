"""Activation checkpointing per MBConv stage: the same training step as without it, in less memory."""

import copy

import pytest
import torch
import torch.nn.functional as F

from effnet import EfficientNet, build
from tests.benchmarks.bench_effnet import peak_step_bytes
from tests.effnet.helpers import as_if_trained

NUM_CLASSES = 10


def _training_step(model: EfficientNet, images: torch.Tensor, labels: torch.Tensor, *, seed: int) -> dict:
    """One forward and backward in train mode; what a user could look at afterwards."""
    model.train()
    torch.manual_seed(seed)  # the same dropout and stochastic-depth draws for both models
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return {
        "logits": logits.detach(),
        "loss": loss.detach(),
        "grads": {name: p.grad for name, p in model.named_parameters()},
        "buffers": {name: b.clone() for name, b in model.named_buffers()},
        "rng_after": torch.get_rng_state(),  # randomness after the step continues identically
    }


def _plain_and_checkpointed(**overrides: object) -> tuple[EfficientNet, EfficientNet]:
    plain = as_if_trained(build("efficientnet_b0", num_classes=NUM_CLASSES, **overrides))
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_activation_checkpointing()
    return plain, checkpointed


@pytest.mark.parametrize("frozen_through", [None, 2])
def test_checkpointed_training_step_equals_plain_one(frozen_through: int | None) -> None:
    # High drop rates: most blocks draw a stochastic-depth mask the recomputation has to replay.
    plain, checkpointed = _plain_and_checkpointed(drop_path_rate=0.5, dropout=0.5)
    if frozen_through is not None:
        plain.freeze(frozen_through)
        checkpointed.freeze(frozen_through)
    images, labels = torch.randn(4, 3, 64, 64), torch.randint(0, NUM_CLASSES, (4,))
    expected = _training_step(plain, images, labels, seed=1)
    actual = _training_step(checkpointed, images, labels, seed=1)

    torch.testing.assert_close(actual["logits"], expected["logits"], rtol=0, atol=0)
    torch.testing.assert_close(actual["loss"], expected["loss"], rtol=0, atol=0)
    for name, grad in expected["grads"].items():
        if grad is None:  # frozen
            assert actual["grads"][name] is None, name
        else:
            torch.testing.assert_close(actual["grads"][name], grad, msg=lambda m, name=name: f"{name}: {m}")
    # BatchNorm statistics (and num_batches_tracked) updated once, not again by the recomputation.
    for name, buffer in expected["buffers"].items():
        torch.testing.assert_close(actual["buffers"][name], buffer, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.equal(actual["rng_after"], expected["rng_after"])
    trained_bn = checkpointed.stages[5][0].project.bn
    assert trained_bn.num_batches_tracked.item() == 1
    if frozen_through is not None:
        assert checkpointed.stages[frozen_through][0].project.bn.num_batches_tracked.item() == 0


def test_checkpointed_feature_maps_give_the_same_gradients() -> None:
    plain, checkpointed = _plain_and_checkpointed()
    images = torch.randn(4, 3, 64, 64)
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        sum(fmap.square().mean() for fmap in model.train().feature_maps(images).values()).backward()
    for (name, expected), actual in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        if expected.grad is None:  # the stages after the last pyramid level take no part
            assert actual.grad is None, name
        else:
            torch.testing.assert_close(actual.grad, expected.grad, msg=lambda m, name=name: f"{name}: {m}")
    for expected, actual in zip(plain.buffers(), checkpointed.buffers(), strict=True):
        assert torch.equal(actual, expected)


def test_a_second_backward_through_a_retained_graph_matches_too() -> None:
    plain, checkpointed = _plain_and_checkpointed()
    images = torch.randn(4, 3, 32, 32)
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        loss = model.train()(images).square().mean()
        loss.backward(retain_graph=True)
        loss.backward()  # recomputes every stage a second time
    for expected, actual in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(actual.grad, expected.grad)
    for expected, actual in zip(plain.buffers(), checkpointed.buffers(), strict=True):
        assert torch.equal(actual, expected)


def test_checkpoints_only_where_a_backward_follows(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    model = build("efficientnet_b0", num_classes=NUM_CLASSES)
    model.set_activation_checkpointing()
    images = torch.randn(2, 3, 32, 32)

    def stages_checkpointed() -> int:
        calls.clear()
        model(images)
        return len(calls)

    assert stages_checkpointed() == len(model.stages)
    with torch.no_grad():
        assert stages_checkpointed() == 0
    model.eval()
    assert stages_checkpointed() == 0
    model.train().freeze(through_stage=2)  # stem and stages 0-2 need no backward
    assert stages_checkpointed() == len(model.stages) - 3
    model.set_activation_checkpointing(False)
    assert stages_checkpointed() == 0


def test_state_dict_and_eval_outputs_unchanged() -> None:
    plain, checkpointed = _plain_and_checkpointed()
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    build("efficientnet_b0", num_classes=NUM_CLASSES).load_state_dict(checkpointed.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(checkpointed.eval()(images), plain.eval()(images))


def test_rejects_a_non_boolean_switch() -> None:
    with pytest.raises(TypeError, match="True or False"):
        build("efficientnet_b0").set_activation_checkpointing("yes")  # type: ignore[arg-type]


def test_checkpointing_lowers_peak_training_memory() -> None:
    # At 96 px the activations outweigh the ~21 MB of weight gradients that both steps allocate
    # (B0 measured: 53 MB plain, 37 MB checkpointed).
    images, labels = torch.randn(4, 3, 96, 96), torch.randint(0, NUM_CLASSES, (4,))
    peaks = {}
    for enabled in (False, True):
        model = build("efficientnet_b0", num_classes=NUM_CLASSES).train()
        model.set_activation_checkpointing(enabled)

        def step(model: EfficientNet = model) -> None:
            F.cross_entropy(model(images), labels).backward()
            model.zero_grad(set_to_none=True)

        step()  # first-call allocations (thread pools, caches) out of the measurement
        peaks[enabled] = peak_step_bytes(step)
    assert peaks[True] < 0.8 * peaks[False], peaks
