import subprocess
import sys
from pathlib import Path

import onnx
from click.testing import CliRunner

from compound.cli import cli


def test_model_list_shows_every_variant() -> None:
    result = CliRunner().invoke(cli, ["model", "list"])
    assert result.exit_code == 0
    for i in range(8):
        assert f"efficientnet_b{i}" in result.output
    assert "66,347,960" in result.output


def test_unknown_variant_exits_non_zero_naming_valid_ones(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["model", "export", "efficientnet_b9", "--out", str(tmp_path / "x.onnx")])
    assert result.exit_code == 1
    assert "unknown EfficientNet variant 'efficientnet_b9'" in result.output
    assert "efficientnet_b7" in result.output
    assert not (tmp_path / "x.onnx").exists()


def test_mismatched_weights_exit_non_zero_and_write_nothing(tmp_path: Path) -> None:
    import torch
    import torchvision

    torch.save(torchvision.models.efficientnet_b1().state_dict(), tmp_path / "b1.pth")
    result = CliRunner().invoke(
        cli, ["model", "export", "efficientnet_b0", "--weights", str(tmp_path / "b1.pth"), "--out", str(tmp_path / "x.onnx")]
    )
    assert result.exit_code == 1
    assert "do not fit efficientnet_b0" in result.output
    assert not (tmp_path / "x.onnx").exists()


def test_torchvision_safetensors_exports_through_the_cli(tmp_path: Path) -> None:
    import safetensors.torch
    import torchvision

    safetensors.torch.save_file(torchvision.models.efficientnet_b0().state_dict(), tmp_path / "tv.safetensors")
    out = tmp_path / "b0.onnx"
    result = CliRunner().invoke(
        cli,
        ["model", "export", "efficientnet_b0", "--weights", str(tmp_path / "tv.safetensors"),
         "--resolution", "64", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(str(out))


def test_num_classes_mismatches_exit_non_zero_naming_the_flag_and_write_nothing(tmp_path: Path) -> None:
    import torch
    import torchvision

    from effnet import build
    from effnet.weights import save_checkpoint

    save_checkpoint(build("efficientnet_b0", num_classes=7), tmp_path / "ckpt.safetensors")
    torch.save(torchvision.models.efficientnet_b0(num_classes=10).state_dict(), tmp_path / "tv10.pth")
    out = tmp_path / "x.onnx"
    export = ["model", "export", "efficientnet_b0", "--resolution", "64", "--out", str(out), "--weights"]

    result = CliRunner().invoke(cli, [*export, str(tmp_path / "ckpt.safetensors"), "--num-classes", "10"])
    assert result.exit_code == 1
    assert "compound checkpoint for 7 classes, not --num-classes 10" in result.output
    assert "leave out --num-classes or pass --num-classes 7" in result.output

    result = CliRunner().invoke(cli, [*export, str(tmp_path / "tv10.pth")])
    assert result.exit_code == 1
    assert "classifier for 10 classes, not the default 1000; pass --num-classes 10" in result.output
    assert "load_reference_weights" not in result.output and "num_classes=" not in result.output
    assert not out.exists()


def test_console_script_exports_a_checked_onnx_file(tmp_path: Path) -> None:
    from effnet import build
    from effnet.weights import save_checkpoint
    from tests.effnet.helpers import as_if_trained

    weights = save_checkpoint(as_if_trained(build("efficientnet_b0", num_classes=10)), tmp_path / "b0.safetensors")
    compound = Path(sys.executable).with_name("compound")
    export = [str(compound), "model", "export", "efficientnet_b0", "--resolution", "64", "--out"]
    result = subprocess.run([*export, str(tmp_path / "b0.onnx"), "--weights", str(weights)],
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "× largest |logit|" in result.stdout
    onnx.checker.check_model(str(tmp_path / "b0.onnx"))

    # A fresh model's logits are all 0: the check says it compared nothing rather than passing.
    result = subprocess.run([*export, str(tmp_path / "fresh.onnx")], check=False, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "not compared, every logit is 0" in result.stdout and "× largest" not in result.stdout
    onnx.checker.check_model(str(tmp_path / "fresh.onnx"))


def test_named_errors_end_a_command_with_their_message_and_others_stay_tracebacks() -> None:
    import click

    from compound.cli.common import exits_cleanly_on
    from jobs.submit import SubmissionError

    class Refused(SubmissionError):
        pass

    @click.command()
    @click.argument("kind")
    @exits_cleanly_on("jobs.submit.SubmissionError")
    def command(kind: str) -> None:
        raise Refused("the cluster can never hold 9 workers") if kind == "named" else KeyError(kind)

    named = CliRunner().invoke(command, ["named"])
    assert named.exit_code == 1 and "Error: the cluster can never hold 9 workers" in named.output
    other = CliRunner().invoke(command, ["other"])
    assert other.exit_code == 1 and isinstance(other.exception, KeyError)  # a bug still shows as one
