"""The local stack's S3 kept across ``stack down`` / ``stack up``: moto's server holds objects in memory only, so
``stack down`` saves the bucket to a folder and ``stack up`` loads it back.

Why: the stack's MLflow and Prefect databases live on disk and keep pointing at artifacts, lineage pointers and MLflow
artifacts in the bucket; a bucket that came back empty made ``lineage show`` answer ``"latest": null`` and ``rlhf
export`` fail with a 404 after a restart. A stack killed without ``stack down`` (SIGKILL, a reboot) still loses what
was stored since the last ``stack down``: moto has no disk of its own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

OBJECTS = "objects"  # the snapshot's folder of object files, numbered (keys need not make a valid file tree)
INDEX = "index.json"  # key -> (file, content type), written last: a snapshot without it is not loaded


def save_bucket(s3: Any, bucket: str, folder: Path) -> int:
    """Every object of ``bucket`` (``s3``: a boto3 S3 client) into ``folder``, replacing an earlier snapshot only
    once this one is whole; returns how many objects were saved."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    index: dict[str, list[str]] = {}
    (partial / OBJECTS).mkdir(parents=True)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            key, name = item["Key"], f"{len(index):08d}"
            response = s3.get_object(Bucket=bucket, Key=key)
            with (partial / OBJECTS / name).open("wb") as out:
                shutil.copyfileobj(response["Body"], out)
            index[key] = [name, response.get("ContentType") or "binary/octet-stream"]
    (partial / INDEX).write_text(json.dumps({"bucket": bucket, "objects": index}))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return len(index)


def load_bucket(s3: Any, bucket: str, folder: Path) -> int:
    """The objects of a whole snapshot in ``folder`` put back into ``bucket`` (``s3``: a boto3 S3 client); returns
    how many (0 without one)."""
    if not (folder / INDEX).is_file():
        return 0
    objects = json.loads((folder / INDEX).read_text())["objects"]
    for key, (name, content_type) in objects.items():
        s3.upload_file(str(folder / OBJECTS / name), bucket, key, ExtraArgs={"ContentType": content_type})
    return len(objects)
