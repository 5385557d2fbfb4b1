"""The local stack a benchmark runs against: started in a temporary state dir on free ports, stopped and
removed after (unless kept), the demo's digits written to it, and `compound job run` against it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from cluster.data.manifest import ShardManifest
    from cluster.storage import S3Access
    from infra.settings import Settings
    from infra.stack import Stack

log = logging.getLogger("local_stack")

COMPOUND = str(Path(sys.executable).with_name("compound"))
LOG_TAIL_CHARS = 3000
STACK_ATTEMPTS = 3
SHARDS_PREFIX = "s3://shards/digits/"  # where the example specs' manifest lives
VAL_FRACTION = 0.2  # `compound data shards`' default, as in the demo
SPLIT_SEED = 0


@contextlib.contextmanager
def local_stack(prefix: str, *, keep: bool = False) -> Iterator[tuple[Stack, Settings]]:
    """A stack of its own for the `with` block; `keep` leaves it running and says how to stop it."""
    from infra.stack import Stack

    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    stack = Stack(home)
    try:
        log.info("starting a local stack in %s", home)
        yield stack, start_stack(stack)
    finally:
        if keep:
            print(f"\nthe stack is still running in {home}: stop it with `compound down --home {home}`, "
                  "then remove the folder")
        else:
            stack.down()
            shutil.rmtree(stack.ray_dir, ignore_errors=True)
            shutil.rmtree(home, ignore_errors=True)


def start_stack(stack: Stack) -> Settings:
    """Up on free ports, retried: on a shared machine another process can take a port before we bind it."""
    from infra.stack import StackError, StackPorts

    for attempt in range(1, STACK_ATTEMPTS + 1):
        try:
            return stack.up(StackPorts.free())[0]
        except StackError as error:
            if attempt == STACK_ATTEMPTS:
                raise
            log.warning("the stack did not start (%s); trying other ports", str(error).splitlines()[0])
    raise AssertionError("unreachable")


def write_digits(s3: S3Access, *, resolution: int, shard_mb: float) -> ShardManifest:
    """The demo's dataset: scikit-learn's digits as shards under SHARDS_PREFIX."""
    from cluster.data.sources import DigitsSource
    from cluster.data.writer import write_shards

    source = DigitsSource(image_size=resolution, val_fraction=VAL_FRACTION, seed=SPLIT_SEED)
    return write_shards(source, SHARDS_PREFIX, s3=s3, shard_bytes=int(shard_mb * 2**20)).manifest


def export_image_folder(manifest: ShardManifest, s3: S3Access, directory: Path, *, split: str = "train") -> int:
    """The split's images as `directory/<class>/<key>.<ext>`, for ImageFolder; returns how many."""
    from cluster.data.samples import image_of, tar_samples
    from cluster.storage import split_s3_url

    client = s3.client()
    tars = directory.parent / f"{directory.name}-tars"
    tars.mkdir(parents=True)
    count = 0
    for shard in manifest.split(split).shards:
        bucket, key = split_s3_url(shard.url)
        tar = tars / Path(key).name
        client.download_file(bucket, key, str(tar))
        with tar.open("rb") as stream:
            for raw in tar_samples(stream, shard.url):
                image = image_of(raw)
                if image is None or "cls" not in raw:
                    continue
                folder = directory / manifest.classes[int(raw["cls"])]
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{raw['__key__']}.{image[0]}").write_bytes(image[1])
                count += 1
    shutil.rmtree(tars)
    return count


def stack_env() -> dict[str, str]:
    """This process's environment for a command against the benchmark's stack: without COMPOUND_* variables,
    which would win over the stack's settings file."""
    return {key: value for key, value in os.environ.items() if not key.startswith("COMPOUND_")}


def run_job(spec: dict, home: Path) -> dict:
    """`compound job run` of `spec` (written to `home/<name>.yaml`) against the stack in `home`; the outcome
    it prints with --json: job, checkpoint, epochs (each epoch's figures), ..."""
    path = home / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = subprocess.run([COMPOUND, "job", "run", str(path), "--json", "--home", str(home)], capture_output=True,
                          text=True, env=stack_env(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"compound job run {spec['name']} exited with {done.returncode}:\n"
                           f"{done.stderr[-LOG_TAIL_CHARS:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith('{"job"')][-1])
