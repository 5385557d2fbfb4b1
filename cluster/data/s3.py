"""Reading and writing shards on S3 with boto3, and the `s3://` opener registered with WebDataset.

WebDataset dispatches URLs through `webdataset.gopen.gopen_schemes`; registering an `s3` entry is
its supported hook. The opener streams with boto3 and survives 5xx answers and connection resets
by reopening the object at the byte where the stream broke (a ranged GET), with backoff.
"""

from __future__ import annotations

import io
import logging
import os
import time
from urllib.parse import urlparse

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError
from webdataset.gopen import gopen_schemes

from infra.settings import Settings

log = logging.getLogger(__name__)

READ_ATTEMPTS = 5
BACKOFF_S = 0.2  # doubled after every failed attempt
MULTIPART = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=16 * 2**20, max_concurrency=4)


class ShardReadError(IOError):
    """A shard could not be read after retries; the message names it."""


def split_s3_url(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an S3 URL: {url!r} (expected s3://bucket/key)")
    return parsed.netloc, parsed.path.lstrip("/")


_settings: Settings | None = None
_clients: dict[tuple[int, int], object] = {}


def s3_client(settings: Settings | None = None):
    """One boto3 client per process (clients must not cross a fork into DataLoader workers)."""
    settings = settings or _settings
    if settings is None:
        raise RuntimeError("call register_s3_opener(settings) before reading s3:// URLs")
    key = (os.getpid(), id(settings))
    if key not in _clients:
        _clients[key] = settings.s3_client()
    return _clients[key]


def register_s3_opener(settings: Settings) -> None:
    """Make `webdataset.gopen("s3://…")` stream through boto3 with these settings."""
    global _settings
    _settings = settings
    gopen_schemes["s3"] = open_s3


def open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: object) -> io.BufferedReader:
    if mode != "rb":
        raise ValueError(f"the s3 opener only reads; got mode {mode!r} for {url}")
    return io.BufferedReader(RetryingS3Reader(s3_client(), url), buffer_size=max(bufsize, 1 << 20))


class RetryingS3Reader(io.RawIOBase):
    """A read-only stream of one S3 object that resumes after errors with a ranged GET."""

    def __init__(self, client, url: str) -> None:
        super().__init__()
        self.client, self.url = client, url
        self.bucket, self.key = split_s3_url(url)
        self.position = 0
        self.size: int | None = None
        self._body = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        for attempt in range(READ_ATTEMPTS):
            try:
                if self._body is None:
                    self._open()
                if self.size is not None and self.position >= self.size:
                    return 0
                data = self._body.read(len(buffer))
                if not data and self.size is not None and self.position < self.size:
                    raise ConnectionResetError(f"stream ended at byte {self.position} of {self.size}")
                buffer[: len(data)] = data
                self.position += len(data)
                return len(data)
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in {"NoSuchKey", "NoSuchBucket", "404"}:
                    if attempt == READ_ATTEMPTS - 1:
                        raise ShardReadError(f"shard {self.url} does not exist") from None
                elif attempt == READ_ATTEMPTS - 1:
                    raise ShardReadError(f"could not read shard {self.url}: {error}") from error
                self._retry_later(attempt, error)
            except (BotoCoreError, OSError) as error:
                if attempt == READ_ATTEMPTS - 1:
                    raise ShardReadError(
                        f"could not read shard {self.url} after {READ_ATTEMPTS} attempts: {error}"
                    ) from error
                self._retry_later(attempt, error)
        raise AssertionError("unreachable")

    def _open(self) -> None:
        extra = {"Range": f"bytes={self.position}-"} if self.position else {}
        response = self.client.get_object(Bucket=self.bucket, Key=self.key, **extra)
        if self.size is None:
            self.size = int(response["ContentLength"])
        self._body = response["Body"]

    def _retry_later(self, attempt: int, error: Exception) -> None:
        log.warning("reading %s at byte %d failed (%s); retrying", self.url, self.position, error)
        self._close_body()
        time.sleep(BACKOFF_S * 2**attempt)

    def _close_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                pass
            self._body = None

    def close(self) -> None:
        self._close_body()
        super().close()
