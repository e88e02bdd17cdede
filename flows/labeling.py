"""Waiting for people's labels inside a flow run.

The iteration's flow run publishes its labeling batch, leaves a waiting record in the store and pauses for input
(``pause_flow_run``): the process stays up, asleep, asking the Prefect API every few seconds whether it was
resumed, and a worker that runs it does nothing else meanwhile. It is resumed by

- ``rlhf label import FLOW_RUN_ID FILE``, which checks and stores the labels first, then resumes it;
- the form in the Prefect UI (a server's UI; Prefect's temporary local server has none): choices per pair, or the
  path of a labels file;
- the Label Studio watcher, which stores the annotations once enough tasks are labeled, then resumes it.

Whichever it was, the run then reads every label stored for its batch; if they cover too few pairs, or a form
entry was wrong, it says so in its log and in the form's description and pauses again. Past
``preferences.label_timeout_s`` it fails, saying how to continue; the batch and the labels stay stored, so running
the same config again finds them without sampling anew.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

from prefect import get_client
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from infra.label_studio import LabelStudio, Watcher, finished
from infra.labeling import (
    LabelError,
    LabelTimeout,
    WaitingRecord,
    check_coverage,
    check_labels,
    covered,
    delete_waiting,
    enough,
    read_batch,
    read_labels_file,
    resume_run,
    store_labels,
    stored_labels,
    write_waiting,
)
from rlhf_core.config import PreferenceConfig
from rlhf_core.labelers import STRENGTH_SCALE, LabelingPair
from tasks.common import PhaseOutput, RunContext, fetch, phase_logger

POLL_INTERVAL_S = 3  # how often a paused run asks the Prefect API whether it was resumed
SHOWN_PAIRS = 20  # pairs shown in the form's description; the rest through `rlhf label export`


class PairChoice(BaseModel):
    """One label entered in the form."""

    pair_id: str = Field(description="The pair's id, from the table above.")
    choice: Literal["a", "b", "tie"] = Field(description="The better response: a, b, or tie.")
    labeler: str = Field(min_length=1, description="Who gives this label.")
    strength: int | None = Field(None, ge=1, le=4, description=f"How much better: {STRENGTH_SCALE}.")


class LabelsForm(RunInput):
    """Labels for the batch this run waits on: a few choices, or a labels file."""

    labels_file: str | None = Field(
        None,
        description="Path of a labels file (.jsonl, .csv, .parquet: pair_id, choice, labeler, optionally strength) "
        "on the machine that runs the flow; it must cover preferences.min_labeled_fraction of the batch.",
    )
    choices: list[PairChoice] | None = Field(None, description="Labels entered here; stored as they come.")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def pause_key(record: WaitingRecord, attempt: int) -> str:
    """A pause key of its own for every wait of a flow run: Prefect answers a key it has seen with the old input."""
    return f"labels-{record.batch_key.rsplit('-', 1)[-1]}-{attempt}"


def describe(record: WaitingRecord, pairs: list[LabelingPair], n_labeled: int, problem: str | None) -> str:
    """The form's description (markdown): what the batch is, how far labeling is, the first pairs."""
    lines = [
        f"### Label iteration {record.iteration}'s {record.kind} pairs: {n_labeled} of {len(pairs)} labeled",
        "",
        f"Which response, **A** or **B**, is better (or **tie**)? Strength, optional: {STRENGTH_SCALE}.",
        "",
        f"All pairs as a file: `rlhf label export {record.flow_run_id} --out pairs.csv`; labels back with "
        f"`rlhf label import {record.flow_run_id} pairs.csv`, or give the file's path below.",
    ]
    if problem:
        lines += ["", f"**Not accepted:** {_cell(problem)}"]
    lines += ["", "| pair_id | prompt | A | B |", "|---|---|---|---|"]
    lines += [
        f"| {p.pair_id} | {_cell(p.prompt)} | {_cell(p.response_a)} | {_cell(p.response_b)} |"
        for p in pairs[:SHOWN_PAIRS]
    ]
    if len(pairs) > SHOWN_PAIRS:
        lines += ["", f"... and {len(pairs) - SHOWN_PAIRS} more pairs: export them as above."]
    return "\n".join(lines)


def accept_form(
    context: RunContext, batch_key: str, answer: LabelsForm, *, pair_ids: set[str], fraction: float
) -> None:
    """Check and store what the form brought; LabelError names the form field and row."""
    if answer.labels_file:
        labels, _ = read_labels_file(Path(answer.labels_file), pair_ids)
        check_coverage([*stored_labels(context.store, batch_key)[0], *labels], pair_ids, fraction, answer.labels_file)
        store_labels(context.store, batch_key, labels, f"form: {answer.labels_file}")
    if answer.choices:
        rows = [choice.model_dump() for choice in answer.choices]
        labels, _ = check_labels(rows, pair_ids, "the form's choices")
        store_labels(context.store, batch_key, labels, "form: choices")


def label_studio_watcher(
    context: RunContext, record: WaitingRecord, pairs: list[LabelingPair], config: PreferenceConfig
) -> Watcher:
    """Import the batch into Label Studio (once per batch) and watch it: once enough tasks are labeled, store the
    annotations and resume this run."""
    settings = config.label_studio
    client, pair_ids = LabelStudio(settings.url), {p.pair_id for p in pairs}
    project = client.project(settings.project_title, config.labels_per_pair)
    marker = f"{record.batch_key}.label-studio.json"
    if not context.store.exists(marker):
        client.import_pairs(project, pairs)
        context.store.put_bytes(marker, json.dumps({"url": client.url, "project": project}).encode())
    phase_logger().warning(
        f"iteration {record.iteration}: label the pairs in Label Studio: {client.url}/projects/{project}"
    )

    def poll() -> list | None:
        labels = client.labels(project, pair_ids)
        return labels if finished(labels, pair_ids, config.labels_per_pair, config.min_labeled_fraction) else None

    def on_finished(labels: list) -> None:
        store_labels(context.store, record.batch_key, labels, f"label-studio: {client.url} project {project}")
        resume_run(record)

    return Watcher(poll, on_finished, settings.poll_interval_s)


def wait_for_labels(
    context: RunContext,
    batch: PhaseOutput,
    config: PreferenceConfig,
    *,
    iteration: int,
    lineage: str | None,
    kind: Literal["preferences", "evaluation"] = "preferences",
) -> list[PhaseOutput]:
    """Wait until the labels stored for ``batch`` cover ``config.min_labeled_fraction`` of its pairs; returns the
    label imports (their digests key the preference dataset made from them). LabelTimeout past the timeout."""
    store, key = context.store, batch.ref.key
    pairs = read_batch(fetch(context, batch))
    pair_ids = {p.pair_id for p in pairs}
    labels, imports = stored_labels(store, key)
    if enough(labels, pair_ids, config.min_labeled_fraction):
        return [PhaseOutput(artifact=ref.to_dict()) for ref in imports]
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url).rstrip("/")
    record = WaitingRecord(
        flow_run_id=str(flow_run.get_id()),
        api_url=api_url,
        lineage=lineage,
        iteration=iteration,
        kind=kind,
        n_pairs=len(pairs),
        batch_key=key,
        batch_uri=batch.ref.uri,
        min_labeled_fraction=config.min_labeled_fraction,
        timeout_s=config.label_timeout_s,
    )
    delete_waiting(store, context.prefix, key)  # an earlier run's record of the same batch
    write_waiting(store, context.prefix, record)
    log = phase_logger()
    log.warning(
        f"iteration {iteration}: waiting for labels of {len(pairs)} {kind} pairs (flow run {record.flow_run_id}): "
        f"`rlhf label export {record.flow_run_id} --out pairs.csv`, then `rlhf label import {record.flow_run_id} "
        "pairs.csv`; or the form of this paused run in the Prefect UI"
    )
    deadline, problem = time.monotonic() + config.label_timeout_s, None
    watcher = label_studio_watcher(context, record, pairs, config) if config.label_studio else nullcontext()
    try:
        with watcher:
            for attempt in itertools.count(1):
                form = LabelsForm.with_initial_data(
                    description=describe(record, pairs, covered(labels, pair_ids), problem)
                )
                remaining = max(1, math.ceil(deadline - time.monotonic()))
                answer = pause_flow_run(
                    form, timeout=remaining, poll_interval=POLL_INTERVAL_S, key=pause_key(record, attempt)
                )
                problem = None
                try:
                    accept_form(context, key, answer, pair_ids=pair_ids, fraction=config.min_labeled_fraction)
                except LabelError as e:
                    problem = str(e)
                    log.error(f"iteration {iteration}: labels not accepted, still waiting: {problem}")
                labels, imports = stored_labels(store, key)
                if enough(labels, pair_ids, config.min_labeled_fraction):
                    break
                if deadline <= time.monotonic():
                    raise FlowPauseTimeout("out of time")
    except FlowPauseTimeout:
        write_waiting(store, context.prefix, record.model_copy(update={"state": "timed out"}))
        raise LabelTimeout(
            f"iteration {iteration}: labels for {covered(labels, pair_ids)} of {len(pairs)} pairs "
            f"within preferences.label_timeout_s={config.label_timeout_s:g} s. The batch and every label stay stored: "
            f"import labels with `rlhf label import {record.flow_run_id} FILE` and run the same command again, "
            "which finds the batch and its labels without sampling anew"
        ) from None
    delete_waiting(store, context.prefix, key)
    return [PhaseOutput(artifact=ref.to_dict()) for ref in imports]
