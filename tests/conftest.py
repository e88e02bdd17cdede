import os
import socket
from collections.abc import Iterator

import pytest

from rlhf_core import world
from rlhf_core.config import SFTConfig
from rlhf_core.engine import Optimization, TorchEngine
from rlhf_core.modeling import load_policy, load_tokenizer
from rlhf_core.sft import train_sft


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API (moto's server) on loopback, with boto3 pointed at it through the AWS env."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_PROFILE": None,  # a developer's profile must not override the fake credentials
        "AWS_SESSION_TOKEN": None,
    }
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, uniquely named bucket on the loopback S3 endpoint."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A real Prefect API on loopback with a temporary database, for flows and clients in this process; its
    server registers the aws-credentials block type itself (from Prefect's collection registry), as any does."""
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(scope="session")
def pipeline_env(tmp_path_factory) -> dict[str, str]:
    """Environment for running the real ``rlhf`` CLI in a subprocess: Prefect's temporary server with its
    own home (so caches start empty), no analytics, MLflow from the config only."""
    home = tmp_path_factory.mktemp("prefect-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "RLHF_CACHE_DIR": str(tmp_path_factory.mktemp("artifact-cache")),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    return env


TINY_WORLD = world.WorldConfig(n_demonstrations=600, hidden_size=32, num_layers=2, num_heads=2)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base")
    tokenizer = world.build_tokenizer()
    world.build_model(tokenizer, TINY_WORLD, seed=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def sft_dir(base_dir, tmp_path_factory):
    """A briefly fine-tuned policy, shared by the later phases' tests."""
    tokenizer, model = load_tokenizer(base_dir), load_policy(base_dir)
    w = world.make_world(0, TINY_WORLD)
    config = SFTConfig(epochs=3, batch_size=32, lr=1e-2, warmup_steps=2)
    engine = TorchEngine(model, Optimization(lr=config.lr, total_steps=60, warmup_steps=2))
    train_sft(engine, tokenizer, w.demonstrations, config, seed=0)
    directory = tmp_path_factory.mktemp("sft")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
