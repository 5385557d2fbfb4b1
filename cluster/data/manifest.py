"""The manifest of a sharded dataset: which tar shards make each split, how many samples each holds,
and their sha256. Written last by the shard writer, so a manifest on S3 means a complete dataset.
The sha256 of the manifest file is the dataset's identity; training logs it with every run.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.storage import S3Access, s3_error_code, split_s3_url

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "compound.shards/1"


class ManifestError(ValueError):
    """A manifest is missing, malformed, or does not match the shards it names."""


class ShardInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    samples: int = Field(ge=1)
    bytes: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class SplitInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    shards: tuple[ShardInfo, ...]

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)


class ShardManifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = MANIFEST_FORMAT
    source: str
    created: datetime
    classes: tuple[str, ...]
    image_format: str
    splits: dict[str, SplitInfo]

    def split(self, name: str) -> SplitInfo:
        try:
            return self.splits[name]
        except KeyError:
            raise ManifestError(f"the dataset has no split {name!r}; it has {', '.join(self.splits)}") from None

    def to_bytes(self) -> bytes:
        return (self.model_dump_json(indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> ShardManifest:
        try:
            manifest = cls.model_validate_json(data)
        except ValidationError as error:
            raise ManifestError(f"{where} is not a valid shard manifest: {error}") from None
        if manifest.format != MANIFEST_FORMAT:
            raise ManifestError(f"{where} has format {manifest.format!r}; this compound reads {MANIFEST_FORMAT!r}")
        return manifest


def dataset_id(manifest_bytes: bytes) -> str:
    """The dataset's identity: sha256 of its manifest file."""
    return hashlib.sha256(manifest_bytes).hexdigest()


def load_manifest(url: str, *, s3: S3Access) -> tuple[ShardManifest, str]:
    """The manifest at `url` (s3://bucket/prefix/manifest.json or the prefix) and the dataset id."""
    if not url.endswith(".json"):
        url = url.rstrip("/") + "/" + MANIFEST_NAME
    bucket, key = split_s3_url(url)
    try:
        data = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except BotoCoreError as error:
        raise ManifestError(
            f"could not reach the S3 store {s3.endpoint or '(AWS)'} to read {url}: {error}. "
            "Is the stack up (`compound stack status`)?"
        ) from None
    except ClientError as error:
        raise ManifestError(
            f"no dataset at {url} ({s3_error_code(error)}): write one with `compound data shards SOURCE s3://bucket/prefix/`"
        ) from None
    return ShardManifest.from_bytes(data, url), dataset_id(data)


def verify_shards(manifest: ShardManifest, split: str, *, s3: S3Access) -> None:
    """Before training: every shard of `split` exists with the manifest's size and sha256.

    A HEAD per shard: the writer stores each shard's sha256 in its object metadata. The bytes
    themselves are hashed again while they stream, shard by shard.
    """
    for shard in manifest.split(split).shards:
        if "://" not in shard.url:
            continue  # a local copy; checked while it is read
        bucket, key = split_s3_url(shard.url)
        try:
            head = s3.client().head_object(Bucket=bucket, Key=key)
        except ClientError as error:
            raise ManifestError(f"shard {shard.url} is missing ({s3_error_code(error)})") from None
        stored = head.get("Metadata", {}).get("sha256")
        if head["ContentLength"] != shard.bytes or stored != shard.sha256:
            raise ManifestError(
                f"shard {shard.url} does not match the manifest: {head['ContentLength']} bytes with sha256 "
                f"{stored or 'unknown'}, expected {shard.bytes} bytes with sha256 {shard.sha256}. "
                "The dataset changed after it was written; write it again with --overwrite."
            )
