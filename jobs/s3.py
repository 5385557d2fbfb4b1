"""How jobs reach the S3 store: the S3 access handed to workers, built from the settings."""

from __future__ import annotations

from cluster.storage import S3Access
from infra.settings import Settings


def s3_access(settings: Settings) -> S3Access:
    """The picklable S3 description workers receive (keys stay `SecretStr`)."""
    return S3Access(
        endpoint=settings.s3_endpoint, region=settings.s3_region, access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key, retry_window_s=settings.s3_retry_window_s,
    )
