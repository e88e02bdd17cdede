"""Artifact storage: one small interface over a local folder or an S3 bucket.

Pipeline steps exchange artifacts (datasets, checkpoints, eval reports) as folders in an
object store. A folder counts as an artifact only once its MANIFEST.json exists; the manifest
is written last, so a crash mid-upload leaves a folder that is visibly incomplete.

    store = open_store("s3://rlhf-artifacts/runs")   # or "/data/rlhf-artifacts"
    ref = upload_dir(store, Path("out/sft"), "exp1/sft", metadata={"step": 1000})
    meta = download_dir(store, ref.key, Path("/tmp/sft"))

S3 endpoint and credentials come from the standard AWS environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE), so MinIO and moto work unchanged, or from a
client factory given to open_store (infra/credentials.py builds one from a Prefect AwsCredentials block).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

__all__ = [
    "MANIFEST",
    "ArtifactRef",
    "IncompleteArtifactError",
    "LocalStore",
    "ObjectNotFoundError",
    "ObjectStore",
    "S3Store",
    "StorageError",
    "TransientStorageError",
    "download_dir",
    "file_digest",
    "folder_digest",
    "is_complete",
    "open_store",
    "read_manifest",
    "upload_dir",
]

MANIFEST = "MANIFEST.json"
_PARTIAL = ".partial"  # suffix of in-flight local writes; never listed as keys
_CHUNK = 1 << 20
_AWS_ENV = "the standard AWS environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"

# builds the boto3 S3 client from a botocore Config; must pickle without secrets (see infra/credentials.py)
S3ClientFactory = Callable[[Any], Any]


class StorageError(RuntimeError):
    """A permanent storage problem; the message names the location and what to check."""


class TransientStorageError(StorageError):
    """A storage failure that may pass (connection lost, 5xx, throttling) after the client's own retries."""


class ObjectNotFoundError(StorageError):
    """The key does not exist in the store."""


class IncompleteArtifactError(StorageError):
    """An artifact without a valid manifest, or whose files do not match it."""


# -----------------------------------------------------------------------------
# keys


def _check_key(key: str, allow_empty: bool = False) -> str:
    """Validate a relative "/"-separated key; a trailing "/" is dropped. Returns the clean key."""
    if not isinstance(key, str):
        raise StorageError(f"key must be a str, got {type(key).__name__}: {key!r}")
    clean = key[:-1] if key.endswith("/") and key != "/" else key
    if clean == "":
        if allow_empty:
            return ""
        raise StorageError("empty key: give a relative path such as 'exp1/sft/model.safetensors'")
    if clean.startswith("/") or "\\" in clean or "\x00" in clean:
        raise StorageError(f"invalid key {key!r}: use a relative, '/'-separated key (no leading '/', no '\\')")
    if any(part in ("", ".", "..") for part in clean.split("/")):
        raise StorageError(f"invalid key {key!r}: empty, '.' and '..' segments are not allowed")
    return clean


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _under(key: str, prefix: str) -> bool:
    """Folder semantics: 'a/b' covers 'a/b' and 'a/b/x', never 'a/bc'."""
    return not prefix or key == prefix or key.startswith(prefix + "/")


# -----------------------------------------------------------------------------
# stores


class ObjectStore(ABC):
    """A flat key -> bytes store with '/'-separated relative keys.

    Prefixes have folder semantics: prefix 'a/b' covers the key 'a/b' and keys under 'a/b/'.
    """

    uri: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write one object atomically: readers see the old or the new content, never a mix."""

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create one object only if none exists at key; True if this call created it, False if one was there.

        Atomic create-if-absent where the backend offers it (a hard link on a file system, a conditional PUT on
        S3), so of two concurrent writers exactly one wins; the object is never visible half-written."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read one object; ObjectNotFoundError (a StorageError) naming the key if absent."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object exists at key."""

    @abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]:
        """Sorted keys (relative to the store root) under prefix; '' lists everything."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under prefix (no-op if none). The empty prefix is refused."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Upload a local file atomically (streamed; fine for multi-GB checkpoints)."""

    @abstractmethod
    def get_file(self, key: str, path: Path) -> None:
        """Download an object to a local file, creating parent folders; atomic on the local side."""

    @abstractmethod
    def full_uri(self, key: str) -> str:
        """Absolute location of key, e.g. 's3://bucket/prefix/key' or '/abs/root/key'."""

    @abstractmethod
    def fingerprint(self, key: str) -> str:
        """What identifies the object's content without reading it where the backend can (S3: ETag and size; a
        file: its sha256); ObjectNotFoundError naming the key if absent."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temp file in the same folder, then os.replace (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_PARTIAL)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; stores are often shared between users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _link_if_absent(tmp: str, path: Path, data: bytes) -> bool:
    """Give the complete file ``tmp`` the name ``path`` unless that name exists: link(2) fails with EEXIST
    atomically, also on NFS. Where hard links are not supported, O_CREAT|O_EXCL (equally exclusive, but a
    reader may glimpse the file before its bytes are written)."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def _require_file(path: Path) -> None:
    if not Path(path).is_file():
        raise StorageError(f"no local file {path}: check the path")


class LocalStore(ObjectStore):
    """A folder on a local or shared file system (NFS, Lustre, ...)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str, allow_empty: bool = False) -> Path:
        clean = _check_key(key, allow_empty)
        # resolve() follows symlinks, so a link inside the root cannot lead a write outside it
        path = (self.root / clean).resolve()
        if path != self.root and not path.is_relative_to(self.root):
            raise StorageError(f"key {key!r} resolves to {path}, outside the store root {self.root}")
        return path

    @contextlib.contextmanager
    def _os_errors(self, op: str, key: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError as e:
            raise ObjectNotFoundError(f"no object {self.full_uri(key)}") from e
        except OSError as e:
            raise StorageError(
                f"{op} {self.full_uri(key)} failed: {e.strerror or e}; check permissions and free space "
                f"under {self.root}"
            ) from e

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        with self._os_errors("put", key):
            _atomic_write(path, lambda f: f.write(data))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        with self._os_errors("put", key):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_PARTIAL)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                return _link_if_absent(tmp, path, data)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        with self._os_errors("get", key):
            return path.read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str = "") -> list[str]:
        path = self._path(prefix, allow_empty=True)
        if path.is_file():
            return [_check_key(prefix)]
        if not path.is_dir():
            return []
        keys = [
            p.relative_to(self.root).as_posix()
            for p in path.rglob("*")
            if p.is_file() and not (p.name.startswith(".") and p.name.endswith(_PARTIAL))
        ]
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        with self._os_errors("delete", prefix):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def put_file(self, key: str, path: Path) -> None:
        dest = self._path(key)
        _require_file(path)
        with self._os_errors("put", key), open(path, "rb") as src:
            _atomic_write(dest, lambda f: shutil.copyfileobj(src, f, _CHUNK))

    def get_file(self, key: str, path: Path) -> None:
        src_path = self._path(key)
        with self._os_errors("get", key), open(src_path, "rb") as src:
            _atomic_write(Path(path), lambda f: shutil.copyfileobj(src, f, _CHUNK))

    def full_uri(self, key: str) -> str:
        clean = _check_key(key, allow_empty=True)
        return str(self.root / clean) if clean else self.uri

    def fingerprint(self, key: str) -> str:
        path = self._path(key)
        with self._os_errors("read", key):
            sha = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    sha.update(chunk)
        return f"sha256:{sha.hexdigest()}"


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
# a conditional PUT lost: the object exists (412), or another conditional write to it is in flight (409)
_PRECONDITION_FAILED = {"412", "PreconditionFailed", "409", "ConditionalRequestConflict"}
_NOT_IMPLEMENTED = {"501", "NotImplemented"}
_DENIED = {
    "403", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
}  # fmt: skip


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


class S3Store(ObjectStore):
    """A bucket (and optional key prefix) in S3 or any S3-compatible service (MinIO, moto).

    Transient failures (5xx, throttling, connection resets) are retried by botocore's standard
    retry mode; permanent ones (missing bucket, denied access) raise StorageError at once.

    The client comes from boto3's defaults (the AWS environment), or from ``client_factory(config)``
    when given: a picklable callable that holds no secret itself, with an optional ``describe`` string
    naming where its credentials come from, for error messages.
    """

    def __init__(self, bucket: str, prefix: str = "", client_factory: S3ClientFactory | None = None) -> None:
        if not _BUCKET_RE.match(bucket):
            raise StorageError(
                f"invalid S3 bucket name {bucket!r}: 3-63 characters of lowercase letters, digits, '.', '-'"
            )
        self.bucket = bucket
        self.prefix = _check_key(prefix.strip("/"), allow_empty=True)
        self.uri = f"s3://{_join(bucket, self.prefix)}"
        self.client_factory = client_factory
        source = getattr(client_factory, "describe", None) or "the client factory"
        self._credentials = source if client_factory else _AWS_ENV  # where to look, for messages; never values
        self._endpoint_from = f"{source}, " if client_factory else ""
        self._endpoint_from += "AWS_ENDPOINT_URL or the AWS default"

    def __reduce__(self) -> tuple[type[S3Store], tuple[str, str, S3ClientFactory | None]]:
        # boto3 clients do not pickle; rebuild lazily in the receiving process (Prefect workers)
        return (S3Store, (self.bucket, self.prefix, self.client_factory))

    @cached_property
    def _client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": 8, "mode": "standard"})
        if self.client_factory is not None:
            return self.client_factory(config)
        # endpoint comes from AWS_ENDPOINT_URL, which boto3 reads itself
        return boto3.client("s3", config=config)

    def _key(self, key: str, allow_empty: bool = False) -> str:
        return _join(self.prefix, _check_key(key, allow_empty))

    def _endpoint(self) -> str:
        # only scheme://host:port, so a URL with embedded user:password never reaches a message
        url = urlsplit(self._client.meta.endpoint_url or "")
        host = f"{url.hostname}:{url.port}" if url.port else str(url.hostname)
        return f"{url.scheme}://{host}"

    def _error(self, e: Exception, op: str, key: str, probing_bucket: bool = False) -> StorageError:
        """Turn a boto3/botocore exception into a StorageError that says what to check."""
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        where = f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"
        endpoint = f"endpoint {self._endpoint()}, from {self._endpoint_from}"
        code = _code(e)
        if isinstance(e, NoCredentialsError | PartialCredentialsError):
            return StorageError(f"no AWS credentials for {op} {where}: check {self._credentials}")
        if isinstance(e, BotoConnectionError):
            return TransientStorageError(
                f"cannot reach S3 for {op} {where} after retries ({endpoint}): check AWS_ENDPOINT_URL and the network"
            )
        if code == "NoSuchBucket" or (probing_bucket and code in _NOT_FOUND):
            return StorageError(
                f"S3 bucket {self.bucket!r} does not exist ({op} {where}; {endpoint}): check the bucket "
                f"name and that AWS_ENDPOINT_URL points at the right service"
            )
        if code in _NOT_FOUND:
            return ObjectNotFoundError(f"no object {where}")
        if code in _DENIED:
            # the code only: some error bodies echo the access key id
            return StorageError(
                f"S3 denied {op} {where} ({code}; {endpoint}): check that bucket {self.bucket!r} exists, "
                f"the credentials ({self._credentials}) and that they may access it, and AWS_ENDPOINT_URL"
            )
        detail = code or type(e).__name__
        return TransientStorageError(f"S3 {op} {where} failed ({detail}; {endpoint}): {e}")

    @contextlib.contextmanager
    def _s3_errors(self, op: str, key: str, head: bool = False) -> Iterator[None]:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except S3UploadFailedError as e:
            # boto3 wraps the real ClientError; its code tells missing bucket from denied access
            cause = e.__cause__ or e.__context__
            raise self._error(cause if isinstance(cause, Exception) else e, op, key) from e
        except (ClientError, BotoCoreError) as e:
            if head and _code(e) in _NOT_FOUND:
                self._check_bucket(op, key)  # HEAD 404 carries no body: it may be the bucket that is missing
            raise self._error(e, op, key) from e

    def _check_bucket(self, op: str, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, op, key, probing_bucket=True) from e

    def put_bytes(self, key: str, data: bytes) -> None:
        k = self._key(key)
        with self._s3_errors("put", k):
            self._client.put_object(Bucket=self.bucket, Key=k, Body=data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """A conditional PUT (``If-None-Match: *``; AWS S3 since 2024, MinIO, moto). A service that answers
        501 Not Implemented gets a best-effort check-then-put instead, which two writers racing within one
        round trip can both pass: callers that need exclusivity read the object back (see infra/lineage.py)."""
        from botocore.exceptions import ClientError

        k = self._key(key)
        with self._s3_errors("put", k):
            try:
                self._client.put_object(Bucket=self.bucket, Key=k, Body=data, IfNoneMatch="*")
                return True
            except ClientError as e:
                if _code(e) in _PRECONDITION_FAILED:
                    return False
                if _code(e) not in _NOT_IMPLEMENTED:
                    raise
        if self.exists(key):
            return False
        self.put_bytes(key, data)
        return True

    def get_bytes(self, key: str) -> bytes:
        k = self._key(key)
        with self._s3_errors("get", k):
            return self._client.get_object(Bucket=self.bucket, Key=k)["Body"].read()

    def exists(self, key: str) -> bool:
        k = self._key(key)
        try:
            with self._s3_errors("head", k, head=True):
                self._client.head_object(Bucket=self.bucket, Key=k)
        except ObjectNotFoundError:
            return False
        return True

    def _list(self, prefix: str) -> list[str]:
        """Full S3 keys under prefix (folder semantics), sorted."""
        p = self._key(prefix, allow_empty=True)
        keys: list[str] = []
        with self._s3_errors("list", p):
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=p)
            for page in pages:
                keys.extend(o["Key"] for o in page.get("Contents", ()) if _under(o["Key"], p))
        return sorted(keys)

    def list_keys(self, prefix: str = "") -> list[str]:
        n = len(self.prefix) + 1 if self.prefix else 0
        return [k[n:] for k in self._list(prefix)]

    def delete_prefix(self, prefix: str) -> None:
        _check_key(prefix)  # refuse "" like LocalStore: deleting the whole store is never a prefix op
        keys = self._list(prefix)
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = keys[i : i + 1000]
            with self._s3_errors("delete", batch[0]):
                resp = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            if errors := resp.get("Errors"):
                first = errors[0]
                raise StorageError(
                    f"S3 delete failed for {len(errors)} object(s), "
                    f"e.g. s3://{self.bucket}/{first.get('Key')} "
                    f"({first.get('Code')}): check the credentials may delete in bucket {self.bucket!r}"
                )

    def put_file(self, key: str, path: Path) -> None:
        k = self._key(key)
        _require_file(path)
        with self._s3_errors("put", k):
            self._client.upload_file(str(path), self.bucket, k)  # multipart above 8 MB; one PUT is atomic

    def get_file(self, key: str, path: Path) -> None:
        k = self._key(key)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # download_file starts with a HEAD; it writes to a temp name and renames when done
        with self._s3_errors("get", k, head=True):
            self._client.download_file(self.bucket, k, str(path))

    def full_uri(self, key: str) -> str:
        return f"s3://{_join(self.bucket, self._key(key, allow_empty=True))}"

    def fingerprint(self, key: str) -> str:
        k = self._key(key)
        with self._s3_errors("head", k, head=True):
            head = self._client.head_object(Bucket=self.bucket, Key=k)
        return f"etag:{head['ETag'].strip(chr(34))}:size:{head['ContentLength']}"


def open_store(uri: str, client_factory: S3ClientFactory | None = None) -> ObjectStore:
    """'s3://bucket/prefix' -> S3Store; 'file:///abs', '/abs' or 'rel/path' -> LocalStore.

    ``client_factory`` builds an S3 store's client (see S3Store); a local store has no use for it."""
    if not uri:
        raise StorageError("empty store uri: use 's3://bucket/prefix' or a folder path")
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        return S3Store(bucket, prefix, client_factory)
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"unsupported file uri {uri!r}: use file:///absolute/path")
        return LocalStore(parts.path)
    if "://" in uri:
        raise StorageError(f"unsupported store uri {uri!r}: use 's3://bucket/prefix' or a folder path")
    return LocalStore(uri)


# -----------------------------------------------------------------------------
# artifacts: folders sealed by a manifest


@dataclass(frozen=True)
class ArtifactRef:
    """The small, serializable handle a pipeline step returns for an uploaded folder."""

    uri: str  # full uri of the artifact folder
    key: str  # key prefix in the store
    digest: str  # sha256 over the manifest's files and metadata: the artifact's content identity

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArtifactRef:
        return cls(uri=d["uri"], key=d["key"], digest=d["digest"])


def file_digest(path: Path) -> str:
    """The sha256 of a local file's content, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _digest(files: dict[str, Any], metadata: dict[str, Any]) -> str:
    # created_at is left out so the same files + metadata always give the same digest
    body = json.dumps({"files": files, "metadata": metadata}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def _file_table(local_dir: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "size"}}`` of every file under local_dir, hashed in chunks."""
    paths = sorted(p for p in local_dir.rglob("*") if p.is_file())
    return {p.relative_to(local_dir).as_posix(): {"sha256": file_digest(p), "size": p.stat().st_size} for p in paths}


def folder_digest(local_dir: Path) -> str:
    """Content identity of a local folder: the digest an upload of it without metadata would get."""
    return _digest(_file_table(Path(local_dir)), {})


def upload_dir(
    store: ObjectStore,
    local_dir: Path,
    key: str,
    metadata: dict[str, Any] | None = None,
    *,
    provenance: dict[str, Any] | None = None,
) -> ArtifactRef:
    """Upload every file under local_dir to key/<relpath>, then seal it with key/MANIFEST.json. ``metadata`` is part
    of the digest (what the artifact is); ``provenance`` is recorded beside it but not digested (which run made it:
    the same content made by another run is the same artifact)."""
    key = _check_key(key)
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StorageError(f"no local folder {local_dir} to upload to {store.full_uri(key)}")
    metadata = dict(metadata or {})
    json.dumps(metadata)  # a TypeError for unserializable metadata, before anything is uploaded

    files = _file_table(local_dir)
    for rel in files:
        if rel == MANIFEST:
            raise StorageError(f"{local_dir / rel}: {MANIFEST} at the top of an artifact folder is reserved; rename it")
        _check_key(rel)

    # unseal first: if this upload dies halfway, readers must not trust an older manifest
    store.delete_prefix(_join(key, MANIFEST))
    for rel in files:
        store.put_file(_join(key, rel), local_dir / rel)

    digest = _digest(files, metadata)
    manifest = {
        "files": files,
        "metadata": metadata,
        "digest": digest,
        "created_at": datetime.now(UTC).isoformat(),
        **({"provenance": provenance} if provenance else {}),
    }
    store.put_bytes(_join(key, MANIFEST), json.dumps(manifest, sort_keys=True, indent=1).encode())
    return ArtifactRef(uri=store.full_uri(key), key=key, digest=digest)


STORE_ID = "store-id.json"


def store_identity(store: ObjectStore, prefix: str) -> str:
    """A random id kept in the store under ``prefix`` (made on first use): it names this store's content wherever
    the store lives, so a folder moved or copied whole keeps it, and a new store has its own. Prefect's cache keys
    carry it, so a phase is served from cache only where its artifact can be (flows/pipeline.run_phase)."""
    key = f"{prefix.strip('/')}/{STORE_ID}" if prefix.strip("/") else STORE_ID
    try:
        return json.loads(store.get_bytes(key))["id"]
    except (ObjectNotFoundError, ValueError, KeyError, TypeError):
        made = uuid.uuid4().hex
        store.put_bytes(key, json.dumps({"id": made}).encode())
        return made


def read_manifest(store: ObjectStore, key: str) -> dict[str, Any] | None:
    """The artifact's manifest, None if it has none; IncompleteArtifactError if it is malformed."""
    key = _check_key(key)
    try:
        raw = store.get_bytes(_join(key, MANIFEST))
    except ObjectNotFoundError:
        return None
    problem = f"invalid manifest {store.full_uri(_join(key, MANIFEST))}: re-upload the artifact"
    try:
        manifest = json.loads(raw)
        files, metadata = manifest["files"], manifest["metadata"]
        well_formed = isinstance(files, dict) and isinstance(metadata, dict)
        well_formed = well_formed and all(
            isinstance(f["sha256"], str) and isinstance(f["size"], int) for f in files.values()
        )
    except (ValueError, KeyError, TypeError) as e:
        raise IncompleteArtifactError(problem) from e
    if not well_formed:
        raise IncompleteArtifactError(problem)
    return manifest


def is_complete(store: ObjectStore, key: str) -> bool:
    """Cheap check: a valid manifest exists and every file it lists is present (digests not verified)."""
    try:
        manifest = read_manifest(store, key)
    except IncompleteArtifactError:
        return False
    if manifest is None:
        return False
    present = set(store.list_keys(key))
    return all(_join(key, rel) in present for rel in manifest["files"])


def download_dir(store: ObjectStore, key: str, local_dir: Path) -> dict[str, Any]:
    """Download the artifact at key into local_dir, verifying every file; returns its metadata."""
    key = _check_key(key)
    manifest = read_manifest(store, key)
    if manifest is None:
        raise IncompleteArtifactError(
            f"artifact {store.full_uri(key)} has no {MANIFEST}: its upload did not finish or the key is "
            f"wrong; re-run the step that produces it"
        )
    root = Path(local_dir).resolve()
    for rel, info in sorted(manifest["files"].items()):
        _check_key(rel)
        dest = (root / rel).resolve()
        if not dest.is_relative_to(root):
            raise StorageError(f"manifest entry {rel!r} of {store.full_uri(key)} leads outside {root}")
        # verify under a temp name so a corrupt file never appears at its real path
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}{_PARTIAL}")
        try:
            store.get_file(_join(key, rel), tmp)
            size, sha = tmp.stat().st_size, file_digest(tmp)
            if size != info["size"] or sha != info["sha256"]:
                raise IncompleteArtifactError(
                    f"{store.full_uri(_join(key, rel))} does not match {MANIFEST} (sha256 {sha[:12]}.., "
                    f"{size} bytes; expected {info['sha256'][:12]}.., {info['size']} bytes): the artifact "
                    f"was modified or partly overwritten; re-upload it"
                )
            os.replace(tmp, dest)
        except ObjectNotFoundError as e:
            raise IncompleteArtifactError(
                f"artifact {store.full_uri(key)} lists {rel!r} but it is missing: re-upload the artifact"
            ) from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return manifest["metadata"]
