"""S3 clients from a Prefect ``AwsCredentials`` block, for :class:`infra.storage.S3Store`.

    store = open_store("s3://rlhf-artifacts/runs", client_factory=AwsCredentialsBlock("rlhf-s3"))

The block is read from the Prefect API (``PREFECT_API_URL``, or Prefect's temporary local server) each
time a store builds its client, so a rotated key is picked up by the next store opened. Only the block's
name is held, printed, pickled (to Prefect workers) or hashed into cache keys; the secret lives in the
Prefect server's block document and in the boto3 client only.

The block document is read through the Prefect client, without importing ``prefect_aws``: Prefect's server
registers the ``aws-credentials`` block type itself, so a block made in the UI, with ``prefect block create``
or with ``prefect_aws.AwsCredentials(...).save(name)`` is read the same way.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from infra.storage import ObjectStore, StorageError, TransientStorageError, open_store

__all__ = [
    "BLOCK_TYPE_SLUG",
    "AwsCredentialsBlock",
    "StorageConfig",
    "open_configured_store",
    "refuse_credentials",
    "s3_client_factory",
]

BLOCK_TYPE_SLUG = "aws-credentials"
_BLOCK_NAME = re.compile(r"[a-z0-9-]+")


def refuse_credentials(uri: str | None, where: str) -> None:
    """Refuse a URI with user:password in it: the config is stored as Prefect parameters and MLflow params."""
    if uri and "://" in uri:
        parts = urlsplit(uri)
        if parts.username or parts.password:
            raise ValueError(f"credentials in the URI would be stored with the run's parameters; {where}")


class StorageConfig(BaseModel):
    """Where checkpoints and datasets go."""

    model_config = ConfigDict(extra="forbid")
    uri: str = Field(
        default_factory=lambda: os.environ.get("RLHF_STORAGE_URI") or "./rlhf-artifacts",
        description="A local folder, or s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL, credentials from the "
        "standard AWS environment); default RLHF_STORAGE_URI, else ./rlhf-artifacts.",
    )
    prefix: str = Field("pipelines/default", description="Key prefix of this pipeline's artifacts in the store.")
    aws_credentials_block: str | None = Field(
        None,
        description="Name of a Prefect AwsCredentials block to build the S3 client from (its keys, region and "
        "aws_client_parameters.endpoint_url, read from the Prefect API); null = the standard AWS environment. "
        "Only the name is stored with the run.",
    )

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, uri: str) -> str:
        refuse_credentials(uri, "use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
        return uri

    @field_validator("aws_credentials_block")
    @classmethod
    def _block_name(cls, name: str | None) -> str | None:
        # Prefect's own rule for block names; it also refuses a pasted key (uppercase, '/', '+')
        if name is not None and not _BLOCK_NAME.fullmatch(name):
            raise ValueError("a Prefect block name: lowercase letters, digits and '-' (the name, never the key)")
        return name

    def open(self) -> ObjectStore:
        return open_configured_store(self.uri, self.aws_credentials_block)


@dataclass(frozen=True)
class AwsCredentialsBlock:
    """A client factory for S3Store: ``factory(botocore_config)`` -> a boto3 S3 client built from the block."""

    name: str

    @property
    def describe(self) -> str:
        """Where the credentials come from, for error messages."""
        return f"the Prefect AwsCredentials block {self.name!r}"

    def _read(self) -> dict[str, Any]:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        try:
            with get_client(sync_client=True) as client:
                document = client.read_block_document_by_name(self.name, BLOCK_TYPE_SLUG, include_secrets=True)
        except ObjectNotFound:
            raise StorageError(
                f"no Prefect AwsCredentials block named {self.name!r} on the Prefect API (PREFECT_API_URL): "
                f"create it (Prefect UI, `prefect block create aws-credentials`, or "
                f"prefect_aws.AwsCredentials(...).save({self.name!r})), or set storage.aws_credentials_block "
                f"to null to use the standard AWS environment"
            ) from None
        except Exception as e:  # connection refused, 5xx, timeouts: the message names no secret
            raise TransientStorageError(
                f"cannot read the Prefect AwsCredentials block {self.name!r} ({type(e).__name__}): check "
                f"PREFECT_API_URL and that the Prefect server is up"
            ) from e
        return dict(document.data)

    def __call__(self, config: Any) -> Any:
        """A boto3 S3 client from the block; ``config`` (botocore Config) is merged under the block's own."""
        import boto3
        from botocore.config import Config

        data = self._read()
        params = dict(data.get("aws_client_parameters") or {})
        session = boto3.Session(
            aws_access_key_id=data.get("aws_access_key_id"),
            aws_secret_access_key=data.get("aws_secret_access_key"),
            aws_session_token=data.get("aws_session_token"),
            profile_name=data.get("profile_name"),
            region_name=data.get("region_name"),
        )
        if params.get("config"):
            config = config.merge(Config(**params["config"]))  # the block's settings win
        kwargs: dict[str, Any] = {"config": config}
        if params.get("endpoint_url"):
            kwargs["endpoint_url"] = params["endpoint_url"]  # else AWS_ENDPOINT_URL or the AWS default, as boto3 does
        if params.get("api_version"):
            kwargs["api_version"] = params["api_version"]
        if "use_ssl" in params:
            kwargs["use_ssl"] = params["use_ssl"]
        verify = params.get("verify_cert_path") or params.get("verify")
        if verify is not None:
            kwargs["verify"] = verify
        return session.client("s3", **kwargs)


def s3_client_factory(block_name: str | None) -> AwsCredentialsBlock | None:
    """The client factory for ``storage.aws_credentials_block``: None (the standard AWS environment) when unset."""
    return AwsCredentialsBlock(block_name) if block_name else None


def open_configured_store(uri: str, aws_credentials_block: str | None) -> ObjectStore:
    """The store of ``storage.uri`` with its S3 client from ``storage.aws_credentials_block`` (or the AWS env)."""
    return open_store(uri, s3_client_factory(aws_credentials_block))
