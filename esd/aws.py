"""The one boto3 client factory (DESIGN.md §4.6).

Every AWS call goes through ``client()``: it honours ``AWS_ENDPOINT_URL`` (moto in tests, MinIO or a VPC endpoint in
production), always signs with SigV4, and uses path-style S3 addressing so bucket names never become host names
(MinIO, moto and custom endpoints need that). Credentials come from boto3's usual chain (environment, profile,
instance role).
"""

from __future__ import annotations

import functools

import boto3
from botocore.config import Config
from django.conf import settings


@functools.cache
def _client(service: str, endpoint_url: str | None, region: str) -> object:
    config = Config(
        signature_version="s3v4" if service == "s3" else "v4",
        s3={"addressing_style": "path"},
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=32,
    )
    return boto3.session.Session().client(service, endpoint_url=endpoint_url, region_name=region, config=config)


def client(service: str, *, public: bool = False):
    """A cached client for ``service``. ``public=True`` gives the S3 client that signs browser-facing URLs.

    SigV4 signs the Host header, so URLs handed to clients must be signed for the host they will call
    (``S3_PUBLIC_ENDPOINT_URL``), which may differ from the one the server reaches (``AWS_ENDPOINT_URL``).
    """
    endpoint = settings.AWS_ENDPOINT_URL or None
    if public and settings.S3_PUBLIC_ENDPOINT_URL:
        endpoint = settings.S3_PUBLIC_ENDPOINT_URL
    return _client(service, endpoint, settings.AWS_REGION)


def reset_clients() -> None:
    """Forget cached clients (tests that move AWS_ENDPOINT_URL)."""
    _client.cache_clear()
