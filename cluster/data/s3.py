"""Streaming shards from S3 through an outage: a ranged-retry reader, and the `s3://` opener for WebDataset.

WebDataset dispatches URLs through `webdataset.gopen.gopen_schemes`; registering an `s3` entry is
its supported hook (`register_s3_opener`). Our own loader opens shards with `open_shard` and an
explicit `S3Access`, so one process can read from two stores.

The reader survives 5xx answers, connection resets and a stopped store by reopening the object at
the byte where the stream broke (a ranged GET). It retries with capped exponential backoff and
full jitter (so many readers do not hammer a store that is coming back) for as long as the access
object's `retry_window_s`, counted from the first failure of the outage, then fails naming the
shard and the window.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import random
import time

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError
from webdataset.gopen import gopen_schemes

from cluster.storage import S3Access, is_not_found, split_s3_url

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.2
BACKOFF_CAP_S = 10.0
READ_BUFFER_BYTES = 1 << 20
MULTIPART = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=16 * 2**20, max_concurrency=4)


class ShardReadError(IOError):
    """A shard could not be read within the retry window; the message names it."""


def open_shard(url: str, access: S3Access | None) -> io.BufferedIOBase:
    """A shard's bytes: streamed from S3 for s3:// URLs (with `access`), else a local file."""
    if url.startswith("s3://"):
        if access is None:
            raise ValueError(f"reading {url} needs S3 access; pass an S3Access")
        return io.BufferedReader(RetryingS3Reader(access, url), buffer_size=READ_BUFFER_BYTES)
    return open(url, "rb")


def register_s3_opener(access: S3Access) -> None:
    """Make `webdataset.gopen("s3://…")` stream through the retrying reader with `access`."""
    gopen_schemes["s3"] = functools.partial(_gopen_s3, access=access)


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, *, access: S3Access, **_: object) -> io.BufferedReader:
    if mode != "rb":
        raise ValueError(f"the s3 opener only reads; got mode {mode!r} for {url}")
    return io.BufferedReader(RetryingS3Reader(access, url), buffer_size=max(bufsize, READ_BUFFER_BYTES))


def backoff_s(attempt: int) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, first × 2^attempt)]."""
    return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2**attempt))


class RetryingS3Reader(io.RawIOBase):
    """A read-only stream of one S3 object that resumes after errors with a ranged GET."""

    def __init__(self, access: S3Access, url: str) -> None:
        super().__init__()
        self.access, self.url = access, url
        self.bucket, self.key = split_s3_url(url)
        self.position = 0
        self.size: int | None = None
        self._body = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        outage_started: float | None = None
        attempt = 0
        while True:
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
                if outage_started is not None:
                    log.info("reading %s again after %.0f s", self.url, time.monotonic() - outage_started)
                return len(data)
            except (ClientError, BotoCoreError, OSError) as error:
                now = time.monotonic()
                outage_started = outage_started if outage_started is not None else now
                if now - outage_started >= self.access.retry_window_s:
                    raise ShardReadError(self._failure(error)) from error
                log.warning("reading %s at byte %d failed (%s); retrying", self.url, self.position, error)
                self._close_body()
                time.sleep(backoff_s(attempt))
                attempt += 1

    def _failure(self, error: Exception) -> str:
        window = f"{self.access.retry_window_s:.0f} s"
        if isinstance(error, ClientError) and is_not_found(error):
            return f"shard {self.url} does not exist (still missing after retrying for {window})"
        return (f"could not read shard {self.url} at byte {self.position}: the store did not answer for {window} "
                f"(the retry window, settings s3_retry_window_s); last error: {error}")

    def _open(self) -> None:
        extra = {"Range": f"bytes={self.position}-"} if self.position else {}
        response = self.access.client().get_object(Bucket=self.bucket, Key=self.key, **extra)
        if self.size is None:
            self.size = int(response["ContentLength"])
        self._body = response["Body"]

    def _close_body(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close; it is dropped anyway
                self._body.close()
            self._body = None

    def close(self) -> None:
        self._close_body()
        super().close()
