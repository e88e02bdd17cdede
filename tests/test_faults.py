"""Storage faults: over an S3 endpoint that fails a share of requests (503, 500, dropped connections), every
upload and download still completes, and a whole pipeline run finishes with every artifact whole; a
permanent error (no such bucket) fails the run at once with a message naming the bucket."""

import json
import os

import boto3
import pytest
from faulty_s3 import FaultyS3
from test_flow import rlhf_run, summary

from infra.storage import download_dir, open_store, upload_dir


def aws_env(endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    return env | {"AWS_ENDPOINT_URL": endpoint}


def test_uploads_and_downloads_survive_a_third_of_requests_failing(s3_endpoint, s3_bucket, tmp_path, monkeypatch):
    with FaultyS3(s3_endpoint, fault_rate=0.3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        store = open_store(f"s3://{s3_bucket}/faulty")
        for i in range(10):
            src = tmp_path / f"src-{i}"
            src.mkdir()
            (src / "weights.bin").write_bytes(os.urandom(200_000))
            (src / "config.json").write_text(f'{{"i": {i}}}')
            ref = upload_dir(store, src, f"artifact-{i}", {"i": i})
            assert download_dir(store, ref.key, tmp_path / f"dst-{i}") == {"i": i}  # digests verified
            assert (tmp_path / f"dst-{i}" / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()
    assert proxy.counts["forwarded"] > 50
    assert sum(proxy.counts[k] for k in ("503", "500", "reset")) > 20


@pytest.mark.slow
def test_the_pipeline_completes_over_a_flaky_s3_with_every_artifact_whole(
    s3_endpoint, s3_bucket, pipeline_env, tmp_path
):
    with FaultyS3(s3_endpoint, fault_rate=0.2, seed=1) as proxy:
        # a cache of its own: every artifact this run reads comes through the proxy, whatever ran before
        env = pipeline_env | aws_env(proxy.url) | {"RLHF_CACHE_DIR": str(tmp_path / "cache")}
        rlhf_run(env, tmp_path, "iterations=1", f"storage.uri=s3://{s3_bucket}/rlhf")
    faults = sum(proxy.counts[k] for k in ("503", "500", "reset"))
    # one in five of about 130 requests (measured: 133, 22 of them faults): fewer than 10 is a 3.6-sigma event
    assert faults >= 10, proxy.counts
    assert summary(tmp_path)["iterations"][0]["iteration"] == 1
    # every artifact is sealed and every file matches its manifest (read straight from moto, no faults)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
        for o in page.get("Contents", [])
    ]
    manifests = [k.removesuffix("/MANIFEST.json") for k in keys if k.endswith("/MANIFEST.json")]
    assert len(manifests) == 7  # data, SFT, the SFT baseline, and one iteration's four phases
    store = open_store(f"s3://{s3_bucket}")
    for key in manifests:
        download_dir(store, key, tmp_path / "check" / key)
    # no stray, unsealed objects: besides the artifacts, only the store's identity and the run's record, one object
    # naming all of them
    others = [k for k in keys if not any(k.startswith(m + "/") for m in manifests)]
    assert "rlhf/pipelines/default/store-id.json" in others
    (record,) = [k for k in others if not k.endswith("/store-id.json")]
    assert record.startswith("rlhf/pipelines/default/runs/") and record.endswith(".json")
    artifacts = json.loads(client.get_object(Bucket=s3_bucket, Key=record)["Body"].read())["artifacts"]
    assert sorted(f"rlhf/{key}" for key in artifacts) == sorted(manifests)


def test_a_missing_bucket_fails_the_run_at_once_naming_it(s3_endpoint, pipeline_env, tmp_path):
    with FaultyS3(s3_endpoint, fault_rate=0.0) as proxy:  # no faults: it counts the requests
        env = pipeline_env | aws_env(proxy.url)
        proc = rlhf_run(env, tmp_path, "storage.uri=s3://no-such-bucket-here/rlhf", check=False)
    assert proc.returncode == 2
    assert "S3 bucket 'no-such-bucket-here' does not exist" in proc.stderr.replace("\n", " ")
    assert proxy.counts["forwarded"] <= 2  # checked before the run starts, not retried
    assert not (tmp_path / "rlhf-mlflow").exists()
