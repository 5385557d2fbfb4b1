"""The job tests' dataset: the digits where the smoke spec expects them."""

import pytest

from cluster.data.manifest import ShardManifest
from cluster.data.sources import DigitsSource
from cluster.data.writer import write_shards
from cluster.storage import S3Access


@pytest.fixture(scope="session")
def digits(s3: S3Access) -> ShardManifest:
    """The demo dataset where the smoke spec expects it: 64 px digits in 0.25 MB shards."""
    source = DigitsSource(image_size=64, val_fraction=0.2, seed=0)
    return write_shards(source, "s3://shards/digits/", s3=s3, shard_bytes=int(0.25 * 2**20), overwrite=True).manifest
