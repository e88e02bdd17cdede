"""People in the loop, for real: an ``rlhf run`` (Prefect's temporary server, MLflow on SQLite, a local store) pauses
at each iteration's labeling batch; ``rlhf label import`` and a form submitted through the Prefect client, as the UI
submits it, resume it; the labels land in the preference dataset with their labelers; a run that times out keeps
its batch and labels, and the same command run again continues without sampling anew. The labels are the simulated
labelers' judgments of the batch's hidden gold rewards, so the test knows what they should say."""

import json
import random
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from test_flow import RLHF, TINY, summary

from flows.labeling import pause_key
from infra.labeling import BATCH_FILE, WaitingRecord, list_waiting, read_batch
from infra.storage import LocalStore
from rlhf_core.labelers import LabelingPair, default_labelers, draw_labels

pytestmark = pytest.mark.slow
HUMAN = [*TINY, "preferences.source=human", "preferences.n_pairs=12", "evaluation.human_pairs=6"]
PREFIX = "pipelines/default"


def start(env: dict, cwd: Path, *overrides: str) -> subprocess.Popen:
    args = [RLHF, "run", "--json", str(cwd / "summary.json"), "--set", f"tracking.uri=sqlite:///{cwd}/mlflow.db"]
    for item in [*HUMAN, *overrides]:
        args += ["--set", item]
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def waiting(proc: subprocess.Popen, cwd: Path, kind: str, iteration: int) -> WaitingRecord:
    """The waiting record of the run's batch of this kind and iteration, once there is one."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        records = list_waiting(LocalStore(cwd / "rlhf-artifacts"), PREFIX) if (cwd / "rlhf-artifacts").exists() else []
        if found := [r for r in records if (r.kind, r.iteration, r.state) == (kind, iteration, "waiting")]:
            return found[0]
        assert proc.poll() is None, f"the run ended instead of waiting: {proc.communicate()[1][-3000:]}"
        time.sleep(1)
    raise AssertionError(f"no {kind} batch of iteration {iteration} waited within 600 s")


def batch_pairs(cwd: Path, record: WaitingRecord) -> list[LabelingPair]:
    return read_batch(cwd / "rlhf-artifacts" / record.batch_key)


def simulated_labels(pairs: list[LabelingPair], seed: int) -> list[dict]:
    """Two of the simulated labelers judge every pair by its gold rewards (overlap), with their noise."""
    labelers = default_labelers()[:2]
    golds = [(p.a_gold, p.b_gold) for p in pairs]
    lengths = [(len(p.response_a.split()), len(p.response_b.split())) for p in pairs]
    choices = draw_labels(golds, lengths, labelers, noise_scale=1.0, rng=random.Random(seed))
    return [
        {"pair_id": p.pair_id, "choice": "a" if choices[j][i] else "b", "labeler": f"{lab.name}@example.org"}
        for j, lab in enumerate(labelers)
        for i, p in enumerate(pairs)
    ]


def label(env: dict, cwd: Path, record: WaitingRecord, rows: list[dict], *extra: str) -> subprocess.CompletedProcess:
    path = cwd / f"labels-{record.kind}-{record.iteration}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return subprocess.run(
        [RLHF, "label", "import", record.flow_run_id, str(path), *extra],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


def paused(record: WaitingRecord, attempt: int) -> None:
    """Wait until the run is paused for its form, the ``attempt``-th time for this batch."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + 120
    with temporary_settings({PREFECT_API_URL: record.api_url}), get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            state = client.read_flow_run(record.flow_run_id).state
            keys = (state.state_details.run_input_keyset or {}) if state and state.is_paused() else {}
            if pause_key(record, attempt) in keys.get("response", ""):
                return
            time.sleep(0.5)
    raise AssertionError(f"flow run {record.flow_run_id} did not pause for {pause_key(record, attempt)}")


def submit_form(record: WaitingRecord, run_input: dict) -> None:
    """What the Prefect UI sends when the form is submitted, through the client, at the run's own API."""
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: record.api_url}):
        resume_flow_run(record.flow_run_id, run_input=run_input)


def test_people_label_each_iteration_through_the_cli_and_the_form(pipeline_env, tmp_path):
    proc = start(pipeline_env, tmp_path)

    # iteration 1, preferences: a file short of the batch is refused and the run keeps waiting; the whole one resumes it
    first = waiting(proc, tmp_path, "preferences", 1)
    pairs = batch_pairs(tmp_path, first)
    rows = simulated_labels(pairs, seed=1)
    export = subprocess.run(
        [RLHF, "label", "export", first.flow_run_id, "--out", str(tmp_path / "pairs.csv")],
        cwd=tmp_path,
        env=pipeline_env,
        capture_output=True,
        text=True,
    )
    assert export.returncode == 0 and len((tmp_path / "pairs.csv").read_text().splitlines()) == len(pairs) + 1
    short = label(pipeline_env, tmp_path, first, rows[:3])
    assert short.returncode == 2 and f"labels cover 3 of the batch's {len(pairs)} pairs" in short.stderr
    assert waiting(proc, tmp_path, "preferences", 1).flow_run_id == first.flow_run_id
    done = label(pipeline_env, tmp_path, first, rows)
    assert done.returncode == 0 and f"flow run {first.flow_run_id} resumed" in done.stdout, done.stdout + done.stderr

    # iteration 1, evaluation: the blind (policy, SFT) pairs, labeled in the form
    evaluation = waiting(proc, tmp_path, "evaluation", 1)
    blind = batch_pairs(tmp_path, evaluation)
    picks_policy = [{"pair_id": p.pair_id, "choice": "b" if p.swapped else "a", "labeler": "di"} for p in blind]
    paused(evaluation, 1)
    submit_form(evaluation, {"choices": picks_policy})

    # iteration 2, preferences: a form entry naming a pair of another batch is refused, the run keeps waiting
    second = waiting(proc, tmp_path, "preferences", 2)
    paused(second, 1)
    submit_form(second, {"choices": [{**picks_policy[0], "labeler": "ann"}]})
    paused(second, 2)  # it read the form, refused it and paused again
    submit_form(second, {"choices": simulated_labels(batch_pairs(tmp_path, second), seed=2)})
    evaluation = waiting(proc, tmp_path, "evaluation", 2)
    ties = [{"pair_id": p.pair_id, "choice": "tie", "labeler": "di"} for p in batch_pairs(tmp_path, evaluation)]
    assert label(pipeline_env, tmp_path, evaluation, ties).returncode == 0
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "labels not accepted, still waiting" in stdout + stderr and "is not a pair of this batch" in stdout + stderr

    result = summary(tmp_path)
    assert [it["human_win_rate_vs_sft"] for it in result["iterations"]] == [1.0, 0.5]  # picked policy; all ties
    # where people judge, they pick the champion: iteration 2 is worse by their judgment, so it stays iteration 1's
    name = result["registered_model"]["name"]
    assert result["champion"] == {
        "name": name,
        "version": "1",
        "iteration": 1,
        "metric": "human_win_rate_vs_sft",
        "value": 1.0,
    }
    assert result["registered_model"] == {"name": name, "version": "2", "alias": "newest"}
    prefs = sorted(tmp_path.glob("rlhf-artifacts/pipelines/default/iteration-001/preferences-*/preferences.parquet"))
    table = pq.read_table(prefs[0]).to_pylist()
    assert {row["labeler"] for row in table} == {"ann@example.org", "bo@example.org"}
    assert len(table) == 2 * len(pairs)  # every label, both labelers of every pair (no ties given)
    gold_right = sum(
        row["chosen_gold"] > row["rejected_gold"] for row in table if row["chosen_gold"] != row["rejected_gold"]
    )
    assert gold_right > 0.5 * len(table)  # they judged by gold, with noise
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs(
        [client.get_experiment_by_name("rlhf").experiment_id], "attributes.run_name = 'iteration-1/preferences'"
    )[0]
    metrics = run.data.metrics
    assert metrics["preferences/n_labelers"] == 2 and metrics["preferences/overlap_pairs"] == len(pairs)
    assert 0 <= metrics["preferences/labeler_agreement"] <= 1
    assert "preferences/labeler/ann_example.org/majority_agreement" in metrics
    assert list_waiting(LocalStore(tmp_path / "rlhf-artifacts"), PREFIX) == []  # nothing left waiting


def test_a_run_that_times_out_keeps_its_batch_and_labels_and_the_same_command_continues(pipeline_env, tmp_path):
    overrides = ["iterations=1", "evaluation.human_pairs=0", "preferences.label_timeout_s=8"]
    proc = start(pipeline_env, tmp_path, *overrides)
    record = waiting(proc, tmp_path, "preferences", 1)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert f"labels for 0 of {record.n_pairs} pairs within preferences.label_timeout_s=8 s" in stderr
    assert f"rlhf label import {record.flow_run_id} FILE" in stderr
    batch = next(tmp_path.glob("rlhf-artifacts/pipelines/default/iteration-001/labeling_batch-*")) / BATCH_FILE
    before = batch.read_bytes()

    late = label(pipeline_env, tmp_path, record, simulated_labels(batch_pairs(tmp_path, record), seed=3))
    assert late.returncode == 0 and "no longer waits (timed out); the labels are kept" in late.stdout

    proc = start(pipeline_env, tmp_path, *overrides)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    phases = summary(tmp_path)["phases"]
    assert phases["iteration-1/labeling-batch"] == "Cached" and batch.read_bytes() == before  # not sampled anew
    assert phases["iteration-1/preferences"] == "Completed"
