"""The shard writer: samples from a source → tar shards of a target size → S3, then the manifest.

The manifest is uploaded last, so a prefix holds a usable dataset only once everything is there;
if anything fails, what this run uploaded is deleted again.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import webdataset
from botocore.exceptions import ClientError

from cluster.data.manifest import MANIFEST_NAME, ShardInfo, ShardManifest, SplitInfo
from cluster.data.s3 import MULTIPART
from cluster.data.sources import SPLITS, Sample, Skipped, Source
from cluster.storage import S3Access, s3_error_code, split_s3_url

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 64 * 2**20


class DatasetExistsError(FileExistsError):
    """The destination prefix already holds objects and overwriting was not asked for."""


@dataclass(frozen=True)
class WrittenDataset:
    """What `write_shards` made: the manifest, its URL, and the images it had to skip."""

    manifest: ShardManifest
    url: str
    skipped: tuple[Skipped, ...]


class _SplitWriter:
    """Rolls tar shards for one split in a local dir, uploading each when it reaches the target size."""

    def __init__(self, split: str, workdir: Path, upload: Callable[[Path, int], ShardInfo], shard_bytes: int) -> None:
        self.split, self.workdir, self.upload, self.shard_bytes = split, workdir, upload, shard_bytes
        self.shards: list[ShardInfo] = []
        self._tar: webdataset.TarWriter | None = None
        self._path: Path | None = None
        self._count = 0

    def write(self, sample: Sample) -> None:
        if self._tar is None:
            self._path = self.workdir / f"{self.split}-{len(self.shards):06d}.tar"
            # Whole-second mtimes: a float one (webdataset's default) makes tarfile give every file its
            # own PAX header, 1 KiB each: digits shards 40 % larger and twice as slow to parse.
            self._tar = webdataset.TarWriter(str(self._path), mtime=int(time.time()))
        record = {"__key__": sample.key, sample.image_format: sample.image, "cls": sample.label}
        if sample.meta:
            record["json"] = sample.meta
        self._tar.write(record)
        self._count += 1
        if self._path.stat().st_size >= self.shard_bytes:
            self.finish_shard()

    def finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self.shards.append(self.upload(self._path, self._count))
        self._path.unlink()
        self._tar, self._path, self._count = None, None, 0


def write_shards(
    source: Source, dest: str, *, s3: S3Access, shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False, on_sample: Callable[[], None] | None = None,
) -> WrittenDataset:
    """Write `source` as WebDataset shards under `dest` (s3://bucket/prefix/)."""
    bucket, prefix = split_s3_url(dest.rstrip("/") + "/")
    client = s3.client()
    skipped: list[Skipped] = []
    _check_destination(client, bucket, prefix, overwrite)
    uploaded: list[str] = []

    def upload(path: Path, samples: int) -> ShardInfo:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        key = f"{prefix}{path.name}"
        client.upload_file(str(path), bucket, key, Config=MULTIPART, ExtraArgs={"Metadata": {"sha256": digest}})
        uploaded.append(key)
        log.debug("uploaded s3://%s/%s (%d samples, %.1f MB)", bucket, key, samples, len(data) / 1e6)
        return ShardInfo(url=f"s3://{bucket}/{key}", samples=samples, bytes=len(data), sha256=digest)

    try:
        with tempfile.TemporaryDirectory(prefix="compound-shards-") as workdir:
            writers = {split: _SplitWriter(split, Path(workdir), upload, shard_bytes) for split in SPLITS}
            formats = set()
            for sample in source.samples():
                if isinstance(sample, Skipped):
                    log.warning("skipping %s", sample.reason)
                    skipped.append(sample)
                    continue
                writers[source.split_of(sample.key)].write(sample)
                formats.add(sample.image_format)
                if on_sample is not None:
                    on_sample()
            for writer in writers.values():
                writer.finish_shard()
        splits = {name: SplitInfo(shards=tuple(w.shards)) for name, w in writers.items() if w.shards}
        if not splits:
            raise ValueError(f"{source.name} yielded no usable samples")
        manifest = ShardManifest(
            source=source.name, created=datetime.now(UTC), classes=source.classes,
            image_format=",".join(sorted(formats)),
            splits=splits,
        )
        client.put_object(Bucket=bucket, Key=prefix + MANIFEST_NAME, Body=manifest.to_bytes(),
                          ContentType="application/json")
    except BaseException:
        for key in uploaded:
            client.delete_object(Bucket=bucket, Key=key)
        raise
    if skipped:
        log.warning("skipped %d undecodable or unlabelled images: %s", len(skipped),
                    ", ".join(s.key for s in skipped[:10]))
    return WrittenDataset(manifest, f"s3://{bucket}/{prefix}{MANIFEST_NAME}", tuple(skipped))


def _check_destination(client, bucket: str, prefix: str, overwrite: bool) -> None:
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as error:
        raise ValueError(
            f"bucket {bucket!r} does not exist or is not accessible ({s3_error_code(error)}); "
            "create it first or write to one of the stack's buckets (e.g. s3://shards/...)"
        ) from None
    existing = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for o in page.get("Contents", [])]
    if existing and not overwrite:
        raise DatasetExistsError(
            f"s3://{bucket}/{prefix} already holds {len(existing)} objects; pass --overwrite to replace that dataset"
        )
    for key in existing:  # the old dataset goes first, so no manifest ever names a mix of old and new shards
        client.delete_object(Bucket=bucket, Key=key)
