"""S3 credentials from a Prefect AwsCredentials block: a real Prefect API (the test harness's server) holds the
block, moto's S3 server on loopback is the store, and the AWS environment holds no credentials at all. The block's
secret must reach the S3 client and nothing else: not the bucket, the config, MLflow params, pickles or logs."""

import json
import logging
import pickle
import uuid
from pathlib import Path

import boto3
import pytest

from flows.config import ConfigError, PipelineConfig, load_config
from flows.pipeline import open_lineage
from infra.credentials import BLOCK_TYPE_SLUG, open_configured_store, s3_client_factory
from infra.lineage import LineagePointer
from infra.storage import StorageError, download_dir, open_store, upload_dir
from infra.tracking import Tracker
from tasks.common import PhaseOutput, RunContext

ACCESS_KEY_ID = "AKIABLOCKONLY7QX2ZP"
SECRET = "blockSecret/Zq8+DO-NOT-LEAK-5f3c9e71"
FILES = {"config.json": b'{"layers": 2}', "model.safetensors": bytes(range(256)) * 64, "tok/vocab.txt": b"a\nb\n"}


def save_aws_credentials_block(name: str, data: dict) -> None:
    """Save a block document of Prefect's aws-credentials type, as the UI, `prefect block create` or
    prefect_aws.AwsCredentials(...).save(name) would."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import BlockDocumentCreate

    with get_client(sync_client=True) as client:
        block_type = client.read_block_type_by_slug(BLOCK_TYPE_SLUG)
        schema = client.get_most_recent_block_schema_for_block_type(block_type.id)
        assert schema is not None and "aws_secret_access_key" in schema.fields["secret_fields"]
        client.create_block_document(
            BlockDocumentCreate(name=name, data=data, block_schema_id=schema.id, block_type_id=block_type.id)
        )


@pytest.fixture
def no_aws_env(s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in the environment can authenticate or find the endpoint: only the block can. (After the
    bucket is made with the conftest's environment credentials.)"""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
                "AWS_DEFAULT_REGION", "AWS_REGION"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def every_object(bucket: str, endpoint: str) -> dict[str, bytes]:
    s3 = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y"
    )
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", ())
    ]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_store_from_block_round_trips_without_leaking_the_secret(
    prefect_api: None,
    s3_endpoint: str,
    s3_bucket: str,
    no_aws_env: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    block = f"rlhf-s3-{uuid.uuid4().hex[:8]}"
    save_aws_credentials_block(
        block,
        {
            "aws_access_key_id": ACCESS_KEY_ID,
            "aws_secret_access_key": SECRET,
            "region_name": "us-east-1",
            "aws_client_parameters": {"endpoint_url": s3_endpoint},
        },
    )
    uri = f"s3://{s3_bucket}/runs"
    config = PipelineConfig(storage={"uri": uri, "aws_credentials_block": block}, lineage="nightly")

    # the standard AWS environment holds no credentials: whatever authenticates below is the block
    assert boto3.Session().get_credentials() is None

    # the run context the flow builds from the config: the block's name, never its keys
    context = RunContext(
        store_uri=config.storage.uri,
        prefix=config.storage.prefix,
        aws_credentials_block=config.storage.aws_credentials_block,
    )
    store = context.store
    ref = upload_dir(store, write_tree(tmp_path / "src", FILES), f"{context.prefix}/sft/model", metadata={"step": 7})
    assert download_dir(context.store, ref.key, tmp_path / "dst") == {"step": 7}
    assert {rel: (tmp_path / "dst" / rel).read_bytes() for rel in FILES} == FILES
    assert ref.uri == f"{uri}/{context.prefix}/sft/model"

    # the lineage's lock and pointer go through the block too, as the flow writes them (its store opened the flow's way)
    lineage = open_lineage(config, open_configured_store(config.storage.uri, config.storage.aws_credentials_block))
    assert lineage is not None and lineage.read() is None
    output = PhaseOutput(artifact=ref.to_dict()).model_dump()
    with lineage.locked("flow-run-1"):
        assert lineage.holder() is not None
        lineage.advance(
            LineagePointer(lineage="nightly", iteration=1, data=output, sft=output, policy=output, preferences=[])
        )
    assert lineage.read().policy == output

    # the store that reached the workers carries the block's name only, and still works there
    blob = pickle.dumps(store)
    assert SECRET.encode() not in blob and ACCESS_KEY_ID.encode() not in blob and block.encode() in blob
    assert pickle.loads(blob).get_bytes(f"{ref.key}/config.json") == FILES["config.json"]
    assert SECRET not in context.model_dump_json() and block in context.model_dump_json()

    # nothing written to the bucket holds the secret (artifacts, manifests, lineage lock)
    objects = every_object(s3_bucket, s3_endpoint)
    assert set(objects) >= {f"runs/{ref.key}/MANIFEST.json", f"runs/{lineage.pointer_key}"}
    assert len(objects) == len(FILES) + 2
    for key, body in objects.items():
        assert SECRET.encode() not in body and ACCESS_KEY_ID.encode() not in body, key
        assert SECRET not in key

    # the config (Prefect flow parameters) keeps the name; MLflow params (logged as the flow logs them) no secret
    dumped = config.model_dump(mode="json")
    assert dumped["storage"]["aws_credentials_block"] == block
    assert SECRET not in json.dumps(dumped)
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "creds")
    with tracker.run("pipeline-test", params=dumped) as run:
        pass
    params = tracker.client.get_run(run.run_id).data.params
    assert params["storage.uri"] == uri
    assert params["storage.aws_credentials_block"] == block  # the block's name says where the keys live
    assert not any(SECRET in k or SECRET in v or ACCESS_KEY_ID in v for k, v in params.items())

    # and no log record on the way carried it (Prefect client, httpx, boto3, botocore, all at DEBUG). The access
    # key id is in botocore's DEBUG dump of each request's SigV4 Authorization header, as it is on the wire.
    assert caplog.records and SECRET not in caplog.text
    assert {r.name for r in caplog.records if ACCESS_KEY_ID in r.getMessage()} <= {"botocore.endpoint"}


def test_missing_block_names_it(prefect_api: None, s3_endpoint: str, s3_bucket: str, no_aws_env: None) -> None:
    context = RunContext(store_uri=f"s3://{s3_bucket}/runs", prefix="p", aws_credentials_block="no-such-block")
    with pytest.raises(StorageError, match="no Prefect AwsCredentials block named 'no-such-block'") as e:
        context.store.list_keys("p")
    assert "storage.aws_credentials_block" in str(e.value)
    # a local store has no use for the block, so it is not looked up
    assert open_store("rel/store", s3_client_factory("no-such-block")).uri.endswith("rel/store")


def test_block_name_is_a_name() -> None:
    assert PipelineConfig().storage.aws_credentials_block is None
    # a key pasted where the name goes is refused, and the message does not repeat it
    with pytest.raises(ConfigError, match="storage.aws_credentials_block") as e:
        load_config(overrides=[f"storage.aws_credentials_block={SECRET}"])
    assert SECRET not in str(e.value)
