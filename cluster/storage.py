"""S3 access for workers: a small, frozen, picklable description of one store.

`jobs/` builds an `S3Access` from the stack's settings and hands it to every process that reads
shards or writes checkpoints; nothing in `cluster/` reads settings itself, so one process can talk
to two stores. Keys are `SecretStr`: they never print. What travels to a cluster carries no keys
(`without_keys`): there, boto3 and pyarrow take them from the cluster's own environment
(`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, an instance role or IRSA).
"""

from __future__ import annotations

import functools
import os
from urllib.parse import urlparse

from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "404", "NotFound"})
# pyarrow's AWS standard strategy backs off exponentially up to 20 s a try: 12 tries ride out a
# couple of minutes of store outage while Ray uploads a checkpoint.
FILESYSTEM_RETRY_ATTEMPTS = 12


class MissingCredentialsError(RuntimeError):
    """A process that must reach S3 has no keys for it."""


class S3Access(BaseModel):
    """Endpoint, region and keys of one S3 store, and how long reads retry through an outage."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint: str = Field(default="", description="S3 API URL, e.g. http://127.0.0.1:8333; empty for AWS S3")
    region: str = "us-east-1"
    # Both or neither: without keys boto3 and pyarrow use AWS's default chain (instance role, IRSA, env).
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None
    retry_window_s: float = Field(default=180.0, gt=0, description="how long a read retries before failing")

    @model_validator(mode="after")
    def _keys_come_in_pairs(self) -> S3Access:
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("set both access_key and secret_key, or neither (to use AWS's default credentials)")
        return self

    def without_keys(self) -> S3Access:
        """The same store, its keys left to the environment of whichever process uses it."""
        return self.model_copy(update={"access_key": None, "secret_key": None})

    def check_credentials(self) -> None:
        """Fail now, with how to fix it, if this process has no keys for the store at all."""
        if self.access_key is None and _session().get_credentials() is None:
            raise MissingCredentialsError(
                f"no S3 credentials for {self.endpoint or 'AWS S3'} in this process's environment: the cluster's "
                "nodes must provide them (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, an instance role or IRSA; "
                "the local stack's Ray head has them once restarted with `compound down; compound up`, "
                "infra/k8s/raycluster.yaml takes them from the compound-s3 Secret)")

    def client(self):  # -> botocore S3 client
        """This process's boto3 client for the store (clients must not cross a fork)."""
        return _client(self, os.getpid())

    def filesystem(self):  # -> pyarrow.fs.S3FileSystem
        """A pyarrow filesystem for the store: what Ray Train writes checkpoints through."""
        from pyarrow.fs import AwsStandardS3RetryStrategy, S3FileSystem

        options = {}
        if self.endpoint:
            parsed = urlparse(self.endpoint)
            options = {"endpoint_override": parsed.netloc, "scheme": parsed.scheme or "https"}
        return S3FileSystem(
            access_key=_reveal(self.access_key), secret_key=_reveal(self.secret_key), region=self.region,
            retry_strategy=AwsStandardS3RetryStrategy(max_attempts=FILESYSTEM_RETRY_ATTEMPTS), **options,
        )


@functools.cache
def _session():  # -> boto3.Session
    """One boto3 session per process tree: it holds no connections, so it is safe across a fork, and
    a DataLoader worker forked from a process that has one makes its client in ~10 ms, not ~150."""
    import boto3

    return boto3.session.Session()


@functools.cache
def _client(access: S3Access, pid: int):
    from botocore.config import Config

    return _session().client(
        "s3", endpoint_url=access.endpoint or None, region_name=access.region,
        aws_access_key_id=_reveal(access.access_key), aws_secret_access_key=_reveal(access.secret_key),
        config=Config(retries={"max_attempts": 5, "mode": "standard"}, s3={"addressing_style": "path"}),
    )


def _reveal(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() if secret is not None else None


def split_s3_url(url: str) -> tuple[str, str]:
    """s3://bucket/key → (bucket, key)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an S3 URL: {url!r} (expected s3://bucket/key)")
    return parsed.netloc, parsed.path.lstrip("/")


def s3_error_code(error: ClientError) -> str:
    """The S3 error code of a failed request (e.g. 'NoSuchKey', '404', 'AccessDenied')."""
    return str(error.response.get("Error", {}).get("Code", "unknown"))


def is_not_found(error: ClientError) -> bool:
    return s3_error_code(error) in NOT_FOUND_CODES


def lost_a_race(error: ClientError) -> bool:
    """A conditional write (If-None-Match, If-Match) refused: another writer got there first."""
    return s3_error_code(error) in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")
