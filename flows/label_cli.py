"""``rlhf label``: the batches runs wait on, out to a file for people and their labels back in."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from flows.console import ConfigOpt, OverridesOpt, console, fail

label_app = typer.Typer(help="Label the pairs a waiting run published: list, export, import.", no_args_is_help=True)
FlowRunArg = Annotated[str, typer.Argument(help="The waiting flow run's id (from `rlhf label pending`).")]


def _store(config: Path | None, overrides: list[str] | None):
    """The configured store and prefix, from the config's storage section only (the rest is not needed here)."""
    from pydantic import ValidationError

    from flows.overrides import ConfigError, describe_errors, read_config_data
    from infra.credentials import StorageConfig

    try:
        storage = StorageConfig.model_validate(read_config_data(config, overrides).get("storage", {}))
    except ConfigError as e:
        fail(e, 2)
    except ValidationError as e:
        fail(f"invalid config: {describe_errors(e, 'storage.')}", 2)
    return storage.open(), storage.prefix


def _batch(store, record):
    from infra.labeling import read_batch
    from infra.storage import download_dir

    with tempfile.TemporaryDirectory(prefix="rlhf-batch-") as tmp:
        download_dir(store, record.batch_key, Path(tmp))
        return read_batch(Path(tmp))


@label_app.command("pending")
def pending(config: ConfigOpt = None, overrides: OverridesOpt = None) -> None:
    """List the labeling batches that runs wait on (or waited on until they timed out)."""
    from infra.labeling import list_waiting, stored_labels

    store, prefix = _store(config, overrides)
    records = list_waiting(store, prefix)
    if not records:
        console.print(f"no labeling batch is waiting under {store.full_uri(prefix)}")
        return
    console.print(f"labeling batches waiting under {store.full_uri(prefix)}:", markup=False)
    for r in records:
        labeled = len({label.pair_id for label in stored_labels(store, r.batch_key)[0]})
        console.print(
            f"{r.flow_run_id}  lineage {r.lineage or '-'}  iteration {r.iteration}  {r.kind}  {r.n_pairs} pairs, "
            f"{labeled} labeled  {r.state} since {r.since}\n  batch {r.batch_uri}",
            markup=False,
            soft_wrap=True,
        )


@label_app.command("export")
def export(
    flow_run_id: FlowRunArg,
    out: Annotated[Path, typer.Option("--out", help="File to write: .jsonl, .csv or .parquet.")],
    config: ConfigOpt = None,
    overrides: OverridesOpt = None,
) -> None:
    """Write the pairs a run waits on, with empty choice, strength and labeler columns to fill in."""
    from infra.labeling import LabelError, export_batch, read_waiting

    store, prefix = _store(config, overrides)
    try:
        record = read_waiting(store, prefix, flow_run_id)
        export_batch(_batch(store, record), out)
    except LabelError as e:
        fail(e, 2)
    console.print(
        f"{record.n_pairs} pairs written to {out}: fill in choice (a, b or tie), labeler and optionally strength "
        f"(1-4), then `rlhf label import {flow_run_id} {out}`",
        markup=False,
    )


@label_app.command("import")
def import_labels(
    flow_run_id: FlowRunArg,
    labels_file: Annotated[
        Path, typer.Argument(help="Labels: .jsonl, .csv or .parquet (pair_id, choice, labeler, strength).")
    ],
    *,
    partial: Annotated[
        bool, typer.Option(help="Store labels that leave the batch short of preferences.min_labeled_fraction.")
    ] = False,
    config: ConfigOpt = None,
    overrides: OverridesOpt = None,
) -> None:
    """Check a labels file against the batch, store its labels and resume the waiting run."""
    from infra.labeling import (
        LabelError,
        check_coverage,
        covered,
        read_labels_file,
        read_waiting,
        resume_run,
        store_labels,
        stored_labels,
    )

    store, prefix = _store(config, overrides)
    try:
        record = read_waiting(store, prefix, flow_run_id)
        pair_ids = {p.pair_id for p in _batch(store, record)}
        labels, blank = read_labels_file(labels_file, pair_ids)
        earlier, _ = stored_labels(store, record.batch_key)
        if not partial:
            check_coverage(
                [*earlier, *labels], pair_ids, record.min_labeled_fraction, f"{labels_file} (--partial stores it)"
            )
    except LabelError as e:
        fail(e, 2)
    ref = store_labels(store, record.batch_key, labels, f"file: {labels_file.name}")
    n = covered([*earlier, *labels], pair_ids)
    console.print(
        f"{len(labels)} labels from {len({label.labeler for label in labels})} labeler(s) stored at {ref.uri} "
        f"({blank} rows left unlabeled); {n} of {len(pair_ids)} pairs now have a label",
        markup=False,
    )
    why = resume_run(record)
    if why is None:
        console.print(f"flow run {flow_run_id} resumed", markup=False)
    else:
        console.print(f"{why}; the labels are kept: run the same command again to continue", markup=False)
