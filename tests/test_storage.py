import json
import pickle
import uuid
from pathlib import Path

import boto3
import pytest

from infra.storage import (
    MANIFEST,
    ArtifactRef,
    IncompleteArtifactError,
    LocalStore,
    ObjectStore,
    S3Store,
    StorageError,
    download_dir,
    is_complete,
    open_store,
    read_manifest,
    upload_dir,
)

FILES = {
    "config.json": b'{"n_layer": 2}',
    "model.bin": bytes(range(256)) * 64,
    "tokenizer/vocab.txt": b"a\nb\nc\n",
    "tokenizer/merges/deep.txt": b"",
}


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(f"s3://{request.getfixturevalue('s3_bucket')}/artifacts")


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_open_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = open_store("s3://rlhf-artifacts/runs/exp1/")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("rlhf-artifacts", "runs/exp1")
    assert s3.full_uri("sft/model.bin") == "s3://rlhf-artifacts/runs/exp1/sft/model.bin"
    assert open_store("s3://rlhf-artifacts").full_uri("a") == "s3://rlhf-artifacts/a"
    assert open_store(f"file://{tmp_path}/x").uri == str(tmp_path / "x")
    monkeypatch.chdir(tmp_path)
    local = open_store("./rel/store")
    assert isinstance(local, LocalStore) and local.uri == str(tmp_path / "rel" / "store")
    assert local.full_uri("a/b") == str(tmp_path / "rel" / "store" / "a" / "b")
    for bad in ["gs://bucket/x", "s3://ab/x", "s3://Bad_Bucket/x", ""]:
        with pytest.raises(StorageError):
            open_store(bad)


def test_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", FILES)
    ref = upload_dir(store, src, "exp1/sft", metadata={"step": 1000, "loss": 1.5})
    assert ref.key == "exp1/sft" and ref.uri == store.full_uri("exp1/sft") and len(ref.digest) == 64
    assert ArtifactRef.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref
    assert is_complete(store, "exp1/sft")
    assert store.list_keys("exp1") == sorted([f"exp1/sft/{r}" for r in FILES] + [f"exp1/sft/{MANIFEST}"])

    meta = download_dir(store, "exp1/sft", tmp_path / "dst")
    assert meta == {"step": 1000, "loss": 1.5}
    assert read_tree(tmp_path / "dst") == FILES  # no manifest, no temp files left behind
    assert read_manifest(store, "exp1/sft")["files"]["model.bin"]["size"] == len(FILES["model.bin"])


def test_objects_are_in_the_bucket(s3_bucket: str, tmp_path: Path) -> None:
    store = open_store(f"s3://{s3_bucket}/runs")
    ref = upload_dir(store, write_tree(tmp_path / "src", FILES), "exp1/rm")
    assert ref.uri == f"s3://{s3_bucket}/runs/exp1/rm"

    client = boto3.client("s3")  # independent of the store's client
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
    keys = {o["Key"] for page in pages for o in page.get("Contents", ())}
    assert keys == {f"runs/exp1/rm/{r}" for r in FILES} | {f"runs/exp1/rm/{MANIFEST}"}
    body = client.get_object(Bucket=s3_bucket, Key="runs/exp1/rm/model.bin")["Body"].read()
    assert body == FILES["model.bin"]
    manifest = json.loads(client.get_object(Bucket=s3_bucket, Key=f"runs/exp1/rm/{MANIFEST}")["Body"].read())
    assert set(manifest["files"]) == set(FILES) and manifest["digest"] == ref.digest


def test_missing_manifest_is_incomplete(store: ObjectStore, tmp_path: Path) -> None:
    for rel, data in FILES.items():  # a crash after the files, before the manifest
        store.put_bytes(f"exp1/ppo/{rel}", data)
    assert read_manifest(store, "exp1/ppo") is None
    assert not is_complete(store, "exp1/ppo")
    with pytest.raises(IncompleteArtifactError, match="exp1/ppo"):
        download_dir(store, "exp1/ppo", tmp_path / "dst")
    assert not is_complete(store, "exp1/never-written")


def test_missing_file_is_incomplete(store: ObjectStore, tmp_path: Path) -> None:
    upload_dir(store, write_tree(tmp_path / "src", FILES), "a")
    store.delete_prefix("a/tokenizer")
    assert not is_complete(store, "a")
    with pytest.raises(IncompleteArtifactError, match="tokenizer/"):
        download_dir(store, "a", tmp_path / "dst")


def test_corrupted_file_is_detected(store: ObjectStore, tmp_path: Path) -> None:
    upload_dir(store, write_tree(tmp_path / "src", FILES), "exp1/sft")
    store.put_bytes("exp1/sft/tokenizer/vocab.txt", b"a\nb\nX\n")  # same size, different bytes
    with pytest.raises(IncompleteArtifactError, match="exp1/sft/tokenizer/vocab.txt"):
        download_dir(store, "exp1/sft", tmp_path / "dst")
    assert not (tmp_path / "dst" / "tokenizer" / "vocab.txt").exists()


def test_invalid_manifest(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes(f"a/{MANIFEST}", b'{"files": ')
    assert not is_complete(store, "a")
    with pytest.raises(IncompleteArtifactError, match=f"a/{MANIFEST}"):
        download_dir(store, "a", tmp_path / "dst")


BAD_KEYS = ["../x", "/abs", "a/../../b", "a//b", "a\\b", "./a", ""]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_rejected(store: ObjectStore, key: str, tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"f": b"x"})
    for call in [
        lambda: store.put_bytes(key, b"x"),
        lambda: store.put_file(key, src / "f"),
        lambda: store.get_bytes(key),
        lambda: store.get_file(key, tmp_path / "out"),
        lambda: store.exists(key),
        lambda: store.delete_prefix(key),
        lambda: upload_dir(store, src, key),
    ]:
        with pytest.raises(StorageError, match="key"):
            call()
    if key:
        with pytest.raises(StorageError, match="invalid key"):
            store.list_keys(key)
    assert store.list_keys("") == []


def test_local_store_stays_under_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "store"
    root.mkdir()
    (root / "link").symlink_to(outside)  # a symlink inside the root that leads out
    store = LocalStore(root)
    for key in ["../outside/x", "a/../../outside/x", "link/x", str(outside / "x")]:
        with pytest.raises(StorageError, match="key"):
            store.put_bytes(key, b"x")
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "store"]


def test_missing_key(store: ObjectStore, tmp_path: Path) -> None:
    assert not store.exists("nope/x")
    assert store.list_keys("nope") == []
    with pytest.raises(StorageError, match=f"no object {store.full_uri('nope/x')}$"):
        store.get_bytes("nope/x")
    with pytest.raises(StorageError, match="no object"):
        store.get_file("nope/x", tmp_path / "x")
    store.delete_prefix("nope")  # nothing to delete is fine


def test_missing_bucket(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASECRETIDDONOTPRINT")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-do-not-print")
    bucket = f"no-such-{uuid.uuid4().hex[:12]}"
    store = open_store(f"s3://{bucket}/runs")
    src = write_tree(tmp_path / "src", {"f": b"x"})
    for call in [
        lambda: store.put_bytes("k", b"x"),
        lambda: store.get_bytes("k"),
        lambda: store.exists("k"),
        lambda: store.list_keys("k"),
        lambda: store.put_file("k", src / "f"),
        lambda: store.get_file("k", tmp_path / "k"),
        lambda: is_complete(store, "k"),
        lambda: upload_dir(store, src, "k"),
    ]:
        with pytest.raises(StorageError, match=f"bucket '{bucket}' does not exist") as e:
            call()
        assert "AWS_ENDPOINT_URL" in str(e.value)
        assert "DONOTPRINT" not in str(e.value) and "do-not-print" not in str(e.value)


def test_digest_is_content_identity(store: ObjectStore, tmp_path: Path) -> None:
    a = upload_dir(store, write_tree(tmp_path / "a", FILES), "a", metadata={"seed": 0})
    b = upload_dir(store, write_tree(tmp_path / "b", FILES), "b", metadata={"seed": 0})
    assert a.digest == b.digest and a.key != b.key
    changed = write_tree(tmp_path / "c", {**FILES, "model.bin": FILES["model.bin"][:-1] + b"\x00"})
    assert upload_dir(store, changed, "c", metadata={"seed": 0}).digest != a.digest
    assert upload_dir(store, tmp_path / "a", "d", metadata={"seed": 1}).digest != a.digest
    assert upload_dir(store, tmp_path / "a", "a", metadata={"seed": 0}) == a  # re-upload: same ref


def test_prefixes_are_folders(store: ObjectStore) -> None:
    for key in ["run1/x", "run1/y/z", "run10/x", "run1.txt"]:
        store.put_bytes(key, key.encode())
    assert store.list_keys("run1") == ["run1/x", "run1/y/z"]
    assert store.list_keys("run1/") == ["run1/x", "run1/y/z"]
    assert store.list_keys("") == ["run1.txt", "run1/x", "run1/y/z", "run10/x"]
    store.delete_prefix("run1")
    assert store.list_keys("") == ["run1.txt", "run10/x"]
    store.put_bytes("run1.txt", b"new")  # overwrite
    assert store.get_bytes("run1.txt") == b"new" and store.exists("run1.txt")


def test_reupload_unseals_first(tmp_path: Path) -> None:
    # a re-upload that dies midway must not leave the old manifest vouching for the new files
    store = LocalStore(tmp_path / "store")
    upload_dir(store, write_tree(tmp_path / "v1", FILES), "a")
    # "model.bin/w" cannot be written where the file "model.bin" is: a real failure after config.json
    v2 = write_tree(tmp_path / "v2", {"config.json": b"{}", "model.bin/w": b"w"})
    with pytest.raises(StorageError, match="a/model.bin/w"):
        upload_dir(store, v2, "a")
    assert store.get_bytes("a/config.json") == b"{}"
    assert read_manifest(store, "a") is None and not is_complete(store, "a")


def test_s3_store_pickles(s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}/p")
    store.put_bytes("k", b"v")  # builds the (unpicklable) client
    clone = pickle.loads(pickle.dumps(store))
    assert clone.uri == store.uri and clone.get_bytes("k") == b"v"
