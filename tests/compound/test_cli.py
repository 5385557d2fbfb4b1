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


TINY_PIPELINE = Path(__file__).parents[2] / "pipelines" / "examples" / "digits-tiny.yaml"


def _refused_without_a_stack(tmp_path: Path, args: list[str], expected: str, *, exit_code: int = 2) -> None:
    """A mistake that needs no stack is named, with no stack set up: not hidden behind "run `compound up`"."""
    no_stack = tmp_path / "no-stack"
    result = CliRunner().invoke(cli, [*args, "--home", str(no_stack)])
    assert result.exit_code == exit_code and expected in result.output, result.output
    assert "compound up" not in result.output and "Traceback" not in result.output, result.output
    assert not no_stack.exists()


def test_a_wrong_shards_source_or_destination_is_named_before_the_stack_is_needed(tmp_path: Path) -> None:
    dest = "s3://shards/x/"
    _refused_without_a_stack(tmp_path, ["data", "shards", "/nonexistent", dest], "unknown source '/nonexistent'")
    _refused_without_a_stack(tmp_path, ["data", "shards", "/nonexistent/*.tar", dest], "no tar files match")
    _refused_without_a_stack(tmp_path, ["data", "shards", "/nonexistent", dest, "--if-missing"], "nothing at /nonexistent")
    _refused_without_a_stack(tmp_path, ["data", "shards", "sklearn:digits", "shards/x"], "'shards/x' is not an S3 location")
    _refused_without_a_stack(tmp_path, ["data", "shards", "sklearn:digits", "s3:///x/"], "is not an S3 location")


def test_a_missing_model_or_a_wrong_dataset_is_named_before_the_stack_is_needed(tmp_path: Path) -> None:
    quantize = ["model", "quantize", "--out", str(tmp_path / "out")]
    data = ["--data", "s3://shards/digits/manifest.json"]
    _refused_without_a_stack(tmp_path, [*quantize, "/missing.pth", *data], "/missing.pth: no such file here")
    _refused_without_a_stack(tmp_path, [*quantize, "http://host/m.pth", *data], "no such file here")
    (tmp_path / "weights.pth").write_bytes(b"not read")
    weights = str(tmp_path / "weights.pth")
    _refused_without_a_stack(tmp_path, [*quantize, weights, "--data", "digits/manifest.json"], "is not an S3 location")
    _refused_without_a_stack(tmp_path, [*quantize, weights, *data, "--arch", "efficientnet_b9"], "'efficientnet_b9' is not")
    (tmp_path / "m.onnx").write_bytes(b"not read")
    _refused_without_a_stack(tmp_path, ["model", "evaluate", str(tmp_path / "m.onnx"), "--data", "local"],
                             "'local' is not an S3 location")


def test_a_pipeline_from_no_stage_is_named_before_the_stack_is_needed(tmp_path: Path) -> None:
    expected = "no stage 'evaluation'; stages: teacher, student, int8, evaluate, register, promote"
    _refused_without_a_stack(tmp_path, ["pipeline", "run", str(TINY_PIPELINE), "--from", "evaluation"], expected)
    _refused_without_a_stack(tmp_path, ["pipeline", "submit", str(TINY_PIPELINE), "--from", "evaluation"], expected)
    _refused_without_a_stack(tmp_path, ["pipeline", "run", str(TINY_PIPELINE), "--data", "/local/manifest.json"],
                             "data: should be an S3 URL")


def test_a_schedule_that_can_never_fire_is_refused_before_the_stack_is_needed(tmp_path: Path) -> None:
    add = ["schedule", "add", str(TINY_PIPELINE)]
    _refused_without_a_stack(tmp_path, [*add, "--cron", "0 0 31 2 *"], "--cron '0 0 31 2 *' never fires", exit_code=1)
    _refused_without_a_stack(tmp_path, [*add, "--cron", "0 0 30 2 *"], "never fires", exit_code=1)
    _refused_without_a_stack(tmp_path, [*add, "--on-new-data", "s3:///"], "--on-new-data 's3:///': give an S3 prefix",
                             exit_code=1)
    _refused_without_a_stack(tmp_path, [*add, "--on-new-data", "s3://shards"], "give an S3 prefix", exit_code=1)
