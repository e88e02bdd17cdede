"""A local SQLite MLflow store that was copied or moved with its folder, re-pointed at its own artifacts.

Why: MLflow's SQL store records each experiment's, run's, logged model's and model version's artifact location as
an absolute path. After ``cp -r`` of a run's folder, the copy's database still names the original folder, so a run in
the copy wrote its MLflow artifacts into the original (and read the original's). A store the pipeline made keeps its
artifacts beside the database, in ``<folder>/mlartifacts/``; when the database finds itself in another folder than
the one its paths name, every such path is rewritten to this folder, once, in one transaction.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

ARTIFACTS_DIR = "mlartifacts"
# (table, column) pairs holding an artifact location, in MLflow 3's SQL schema
LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)


def _previous_folder(db: sqlite3.Connection, folder: Path) -> Path | None:
    """The folder the store's artifact paths name, where that is not ``folder``: read from the experiments whose
    artifacts live in ``<some folder>/mlartifacts/`` (the ones the pipeline makes)."""
    marker = f"/{ARTIFACTS_DIR}/"
    for (location,) in db.execute("SELECT artifact_location FROM experiments"):
        path = (location or "").removeprefix("file://")
        if marker in path and path.startswith("/"):
            previous = Path(path.split(marker, 1)[0])
            if previous != folder:
                return previous
    return None


def relocate_copied_store(db_path: Path) -> Path | None:
    """Rewrite the artifact paths of a SQLite store that was copied or moved from another folder to point into
    ``db_path``'s folder; returns the folder they named before, or None where there was nothing to do (a new store,
    one in place, one whose schema or paths are not the pipeline's)."""
    if not db_path.is_file():
        return None
    folder = db_path.parent.resolve()
    try:
        with sqlite3.connect(db_path) as db:
            previous = _previous_folder(db, folder)
            if previous is None:
                return None
            for table, column in LOCATION_COLUMNS:
                for old, new in (
                    (f"file://{previous}/{ARTIFACTS_DIR}/", f"file://{folder}/{ARTIFACTS_DIR}/"),
                    (f"{previous}/{ARTIFACTS_DIR}/", f"{folder}/{ARTIFACTS_DIR}/"),
                ):
                    db.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                        (new, len(old) + 1, len(old), old),
                    )
    except sqlite3.OperationalError:  # not MLflow's schema (or not yet made): MLflow itself will say what is wrong
        return None
    return previous


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI; None for any other store."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])


def settle_local_store(tracking_uri: str) -> None:
    """A local SQLite store copied or moved from another folder, re-pointed at its own artifacts before anything
    reads or writes them, saying so on stderr; any other store is left as it is."""
    db_path = sqlite_path(tracking_uri)
    if db_path is not None and (previous := relocate_copied_store(db_path)) is not None:
        where = db_path.parent.resolve() / ARTIFACTS_DIR
        print(
            f"MLflow store {db_path} was copied or moved from {previous}: its artifacts are now read from and "
            f"written to {where}",
            file=sys.stderr,
        )
