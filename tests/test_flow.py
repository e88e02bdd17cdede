"""The real pipeline through the real ``rlhf`` CLI: Prefect flow runs (temporary server), MLflow on SQLite,
artifacts in a local folder and in S3 (moto's server on loopback)."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

RLHF = str(Path(sys.executable).parent / "rlhf")
TINY = [
    "iterations=2",
    "data.world.n_demonstrations=300",
    "data.world.n_eval_prompts=12",
    "data.world.n_preference_prompts=12",
    "data.world.n_ppo_prompts=12",
    "data.world.hidden_size=32",
    "data.world.num_layers=1",
    "data.world.num_heads=2",
    "sft.epochs=1",
    "sft.batch_size=32",
    "sft.log_every=2",
    "preferences.n_pairs=40",
    "reward.max_epochs=1",
    "reward.batch_size=16",
    "ppo.steps=2",
    "ppo.rollout_batch_size=8",
    "ppo.minibatch_size=4",
    "ppo.epochs=1",
    "ppo.max_new_tokens=12",
    "preferences.max_new_tokens=12",
    "evaluation.max_new_tokens=12",
    "evaluation.n_samples_logged=4",
]
PHASES = ["data", "sft", "sft-baseline"] + [
    f"iteration-{k}/{p}" for k in (1, 2) for p in ("preferences", "reward", "ppo", "evaluation")
]


def rlhf_run(
    env: dict, cwd: Path, *overrides: str, check: bool = True, rerun: bool = False
) -> subprocess.CompletedProcess:
    """``rlhf run`` on the tiny world in ``cwd``; ``rerun``: the flow runs even where an identical run completed."""
    args = [RLHF, "run", "--json", str(cwd / "summary.json"), *(["--rerun"] if rerun else [])]
    for item in [*TINY, *overrides]:
        args += ["--set", item]
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"rlhf run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def rlhf(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """One ``rlhf`` command (export, report, ...) in ``cwd``, its output captured."""
    return subprocess.run([RLHF, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def summary(cwd: Path) -> dict:
    return json.loads((cwd / "summary.json").read_text())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def first_run(workdir: Path, pipeline_env: dict) -> dict:
    rlhf_run(pipeline_env, workdir, f"tracking.uri=sqlite:///{workdir}/mlflow.db")
    return summary(workdir)


def test_end_to_end_run_writes_summary_artifacts_and_tracking(first_run: dict, workdir: Path):
    result = first_run
    assert set(result) >= {
        "sft",
        "iterations",
        "mlflow_tracking_uri",
        "mlflow_run_id",
        "prefect_flow_run_id",
        "artifacts_uri",
    }
    assert isinstance(result["sft"]["gold_reward"], float)
    assert [it["iteration"] for it in result["iterations"]] == [1, 2]
    for it in result["iterations"]:
        assert set(it) >= {
            "win_rate_vs_sft",
            "gold_reward",
            "reward",
            "kl",
            "entropy",
            "response_length",
            "rm_val_accuracy",
            "labeler_agreement",
        }
        assert 0.0 <= it["win_rate_vs_sft"] <= 1.0
    assert result["phases"] == dict.fromkeys(PHASES, "Completed")

    # artifacts: one folder per phase and iteration, each complete (manifest written last) with its lineage
    root = Path(result["artifacts_uri"])
    manifests = {p.parent.relative_to(root).as_posix(): json.loads(p.read_text()) for p in root.rglob("MANIFEST.json")}
    folders = sorted(k.rsplit("-", 1)[0] for k in manifests)
    assert folders == sorted(
        ["data/world", "sft/policy", "sft/baseline"]
        + [
            f"iteration-00{k}/{name}"
            for k in (1, 2)
            for name in ("preferences", "reward_model", "policy", "evaluation")
        ]
    )
    ppo_2 = next(m for k, m in manifests.items() if k.startswith("iteration-002/policy"))
    assert ppo_2["metadata"]["parents"]["reference"].endswith(next(k for k in manifests if k.startswith("sft/policy")))
    assert ppo_2["metadata"]["parents"]["policy"].endswith(
        next(k for k in manifests if k.startswith("iteration-001/policy"))
    )
    reward_2 = next(m for k, m in manifests.items() if k.startswith("iteration-002/reward_model"))
    assert len(reward_2["metadata"]["parents"]["preferences"]) == 2  # all preferences so far
    reward_1 = next(k for k in manifests if k.startswith("iteration-001/reward_model"))
    assert reward_2["metadata"]["parents"]["init"].endswith(reward_1)  # reward.warm_start: continues the last one
    assert next(m for k, m in manifests.items() if k == reward_1)["metadata"]["parents"]["init"].endswith(
        next(k for k in manifests if k.startswith("sft/policy"))
    )
    policy_dir = root / next(k for k in manifests if k.startswith("iteration-002/policy"))
    assert (policy_dir / "model.safetensors").exists() and (policy_dir / "tokenizer.json").exists()
    assert (
        root / next(k for k in manifests if k.startswith("iteration-001/preferences")) / "preferences.parquet"
    ).exists()

    # MLflow: a parent run, a child run per phase and iteration, step metrics, artifacts
    client = MlflowClient(result["mlflow_tracking_uri"])
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.params["ppo.kl_coef"] == "0.15"
    # named from the Prefect flow run: no lineage, then the UTC start time
    assert re.fullmatch(r"pipeline-rlhf-\d{4}-\d\d-\d\dT\d\d-\d\d", parent.info.run_name), parent.info.run_name
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(
        ["sft"] + [f"iteration-{k}/{p}" for k in (1, 2) for p in ("preferences", "reward", "ppo", "evaluation")]
    )
    ppo_run = next(r for r in children if r.info.run_name == "iteration-1/ppo")
    for metric in (
        "ppo/kl",
        "ppo/reward",
        "ppo/gold_reward",
        "ppo/entropy",
        "ppo/response_length",
        "ppo/kl_coef",
        "ppo/clipfrac",
        "ppo/approx_kl",
        "ppo/value_loss",
    ):
        assert [m.step for m in client.get_metric_history(ppo_run.info.run_id, metric)] == [1, 2], metric
    win_rate = client.get_metric_history(parent.info.run_id, "iteration/win_rate_vs_sft")
    assert [m.step for m in win_rate] == [1, 2]
    assert [m.value for m in win_rate] == pytest.approx([it["win_rate_vs_sft"] for it in result["iterations"]])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "samples")}
    assert artifacts == {"samples/iteration_001.json", "samples/iteration_002.json"}
    plot = Path(client.download_artifacts(parent.info.run_id, "plots/iterations.png", str(workdir / "dl")))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_registers_each_policy_and_records_provenance(first_run: dict, pipeline_env: dict):
    result, client = first_run, MlflowClient(first_run["mlflow_tracking_uri"], first_run["mlflow_tracking_uri"])
    parent = client.get_run(result["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    ppo_runs = {r.info.run_name: r.info.run_id for r in children if r.info.run_name.endswith("/ppo")}

    # a logged model per iteration, linked to the PPO run that trained it, with the evaluation logged against it
    models = client.search_logged_models([parent.info.experiment_id])
    by_name = {m.name: m for m in models}
    assert sorted(by_name) == ["policy-iteration-1", "policy-iteration-2"]
    for k, row in enumerate(result["iterations"], start=1):
        model = by_name[f"policy-iteration-{k}"]
        assert model.source_run_id == ppo_runs[f"iteration-{k}/ppo"]
        logged = {m.key: m.value for m in model.metrics}
        assert logged["iteration/win_rate_vs_sft"] == pytest.approx(row["win_rate_vs_sft"])

    # a version per iteration; the champion moves to iteration 2 only when its gold win rate beats iteration 1's by
    # more than the standard error of the difference; "newest" is the last
    win_rates = [row["win_rate_vs_sft"] for row in result["iterations"]]
    errors = [row["win_rate_stderr"] for row in result["iterations"]]
    best = 2 if win_rates[1] - win_rates[0] > math.hypot(*errors) else 1
    name = result["registered_model"]["name"]  # the line's: the toy world's tiny Llama, its data and judge
    assert re.fullmatch(r"rlhf-toy-world-[0-9a-f]{8}", name)
    line = client.get_registered_model(name).tags
    assert (
        line["rlhf.line.data"] == "the toy world (seed 0)" and line["rlhf.line.judge"] == "the toy world's gold judge"
    )
    versions = {int(v.tags["rlhf.iteration"]): str(v.version) for v in client.search_model_versions(f"name = '{name}'")}
    assert sorted(versions) == [1, 2]
    assert result["registered_model"] == {
        "name": name,
        "version": versions[2],
        "alias": "champion" if best == 2 else "newest",
    }
    assert result["champion"] == {
        "name": name,
        "version": versions[best],
        "iteration": best,
        "metric": "win_rate_vs_sft",
        "value": pytest.approx(win_rates[best - 1]),
    }
    assert str(client.get_model_version_by_alias(name, "champion").version) == versions[best]
    assert str(client.get_model_version_by_alias(name, "newest").version) == versions[2]

    # inputs with content digests, provenance tags, system metrics, the report as description and artifact
    inputs = {i.dataset.name: i.dataset.digest for i in parent.inputs.dataset_inputs}
    assert set(inputs) == {"prompts", "demonstrations", "preferences-iteration-1", "preferences-iteration-2"}
    assert all(re.fullmatch(r"[0-9a-f]{16}", digest) for digest in inputs.values())
    from infra.codebase import code_version

    assert parent.data.tags["rlhf.code_version"] == code_version()
    assert parent.data.tags["prefect_flow_run_id"] == result["prefect_flow_run_id"]
    assert all(r.data.tags["rlhf.code_version"] == code_version() for r in children)
    assert all("system/cpu_utilization_percentage" in r.data.metrics for r in children)
    note = parent.data.tags["mlflow.note.content"]
    assert "## Iterations" in note and f"{result['iterations'][-1]['win_rate_vs_sft']:.3f}" in note
    assert {"report.html", "config.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    # Prefect: per iteration a table, samples and links under the line's stable keys (the table's history: one per
    # iteration)
    artifacts = prefect_artifacts(pipeline_env, result["prefect_flow_run_id"])
    keys = [a["key"].removeprefix(f"{name}-") for a in artifacts]
    assert sorted(set(keys)) == ["iterations", "mlflow-run", "policy", "report", "samples"]
    assert keys.count("iterations") == 2 and keys.count("report") == 1
    table = json.loads(
        max((a for a in artifacts if a["key"] == f"{name}-iterations"), key=lambda a: a["created"])["data"]
    )
    assert [row["iteration"] for row in table] == [1, 2]
    assert table[-1]["win_rate_vs_sft"] == pytest.approx(win_rates[-1], abs=1e-4)
    policy_links = [a["data"] for a in artifacts if a["key"] == f"{name}-policy"]
    assert any(result["final_policy_uri"] in link for link in policy_links)


def test_export_writes_a_loadable_model_with_its_card(first_run: dict, workdir: Path, pipeline_env: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tracking = ["--set", f"tracking.uri={first_run['mlflow_tracking_uri']}"]
    out = workdir / "export-champion"
    done = rlhf(pipeline_env, workdir, "export", "--out", str(out), *tracking)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    champion = first_run["champion"]
    reference = AutoModelForCausalLM.from_pretrained(
        next(Path(first_run["artifacts_uri"]).glob(f"iteration-{champion['iteration']:03d}/policy-*"))
    )
    exported, trained = model.state_dict(), reference.state_dict()
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in exported)
    assert tokenizer("hello").input_ids
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    for part in (
        first_run["mlflow_run_id"],
        first_run["prefect_flow_run_id"],
        f"version {champion['version']}",
        "## Iterations",
        "demonstrations: content digest",
        "kl_coef: 0.15",
    ):
        assert part in card, part

    # --iteration picks another version; an existing folder is refused and left as it was
    run_one = ["--run", first_run["mlflow_run_id"], "--iteration", "1"]  # that run's policy of iteration 1
    one = rlhf(pipeline_env, workdir, "export", "--out", str(workdir / "export-1"), *run_one, *tracking)
    assert one.returncode == 0 and "(iteration 1)" in one.stdout, one.stderr[-3000:]
    again = rlhf(pipeline_env, workdir, "export", "--out", str(out), *tracking)
    assert again.returncode == 2 and f"{out} already exists" in again.stderr
    assert (out / "README.md").read_text() == card
    missing = rlhf(pipeline_env, workdir, "export", "--out", str(workdir / "x"), "--iteration", "7", *tracking)
    assert missing.returncode == 2 and "no version for iteration 7 (it has [1, 2])" in missing.stderr
    assert not (workdir / "x").exists()


def test_runs_on_other_data_are_another_line_and_export_never_guesses_across_lines(
    first_run: dict, workdir: Path, pipeline_env: dict, tmp_path: Path
):
    """Two lines in one MLflow store (the first run's world, and the world of seed 1): each has its own registered
    model and champion, and ``rlhf export`` exports from the line it is told, refusing to pick one by itself."""
    where = ["tracking.uri=" + f"sqlite:///{tmp_path}/mlflow.db"]  # a store of its own: the first run's stays as it is
    rlhf_run(pipeline_env, tmp_path, *where, "iterations=1")  # the first run's line
    first = summary(tmp_path)
    rlhf_run(pipeline_env, tmp_path, *where, "iterations=1", "seed=1")
    other = summary(tmp_path)
    one, two = first["registered_model"]["name"], other["registered_model"]["name"]
    assert one == first_run["registered_model"]["name"] and two != one  # the same line as the first run's; another
    assert first["champion"]["name"] == one and other["champion"] == other["champion"] | {"name": two, "version": "1"}

    tracking = ["--set", where[0]]
    out = tmp_path / "export"
    refused = rlhf(pipeline_env, tmp_path, "export", "--out", str(out), *tracking)
    assert refused.returncode == 2 and "2 lines of runs are registered" in refused.stderr, refused.stderr[-2000:]
    assert f"{one}: base_model: the toy world's tiny Llama; data: the toy world (seed 0)" in refused.stderr
    assert f"{two}: base_model: the toy world's tiny Llama; data: the toy world (seed 1)" in refused.stderr
    assert not out.exists()
    for selector, line in (
        (["--model", one], one),
        (["--run", other["mlflow_run_id"]], two),
        ([f"--set={item}" for item in [*TINY, "seed=1"]], two),  # the run's own settings name its line
    ):
        target = tmp_path / f"export-{len(list(tmp_path.glob('export-*')))}"
        done = rlhf(pipeline_env, tmp_path, "export", "--out", str(target), *selector, *tracking)
        assert done.returncode == 0 and f"exported {line} version" in done.stdout, done.stderr[-2000:]
    unknown = rlhf(pipeline_env, tmp_path, "export", "--out", str(out), "--set", "seed=7", *tracking)
    assert unknown.returncode == 2 and "no run of this config's line (rlhf-toy-world-" in unknown.stderr
    assert not out.exists()


def test_report_renders_in_a_real_browser(first_run: dict, workdir: Path, pipeline_env: dict):
    page = workdir / "report.html"
    tracking = f"tracking.uri={first_run['mlflow_tracking_uri']}"
    done = rlhf(pipeline_env, workdir, "report", "--out", str(page), "--set", tracking)
    assert done.returncode == 0, done.stderr[-3000:]
    chromium = shutil.which("chromium")
    assert chromium, "the report test needs Debian's chromium: `make test` installs it (apt-get install chromium)"
    browse = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1300,2400"]
    shot = workdir / "report.png"
    subprocess.run([*browse, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    dom = subprocess.run(
        [*browse, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    tables = re.findall(r"<table>.*?</table>", dom, flags=re.S)
    iterations = next(t for t in tables if "win rate vs SFT (gold)" in t)
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", iterations, flags=re.S)]
    body = [r for r in rows if r]
    assert [r[0] for r in body] == ["SFT", "1", "2"]
    for row, it in zip(body[1:], first_run["iterations"], strict=True):
        assert row[1:4] == [f"{it[k]:.3f}" for k in ("win_rate_vs_sft", "win_rate_stderr", "gold_reward")]
    assert re.search(r'<img [^>]*src="data:image/png;base64,', dom)  # plots embedded: the page stands alone
    assert first_run["mlflow_run_id"] in dom and "Sample completions" in dom


def prefect_artifacts(env: dict, flow_run_id: str) -> list[dict]:
    """The artifacts a flow run created, read through Prefect's API from the database the run used."""
    code = """
import asyncio, json
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as client:
        found = await client.read_artifacts()
    print(json.dumps([{"key": a.key, "data": a.data, "created": str(a.created), "flow_run_id": str(a.flow_run_id)}
                      for a in found]))

asyncio.run(main())
"""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [a for a in json.loads(proc.stdout.strip().splitlines()[-1]) if a["flow_run_id"] == flow_run_id]


def task_run_names(env: dict, flow_run_id: str) -> list[str]:
    """The names of the task runs of a flow run (not of its subflows), read through Prefect's API."""
    code = f"""
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

async def main():
    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=["{flow_run_id}"])))
    print(json.dumps(sorted(r.name for r in runs)))

asyncio.run(main())
"""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_an_identical_run_is_up_to_date_and_a_rerun_is_served_from_cache(
    first_run: dict, workdir: Path, pipeline_env: dict
):
    before = sorted(p.as_posix() for p in Path(first_run["artifacts_uri"]).rglob("MANIFEST.json"))
    client = MlflowClient(first_run["mlflow_tracking_uri"])
    experiment = client.get_run(first_run["mlflow_run_id"]).info.experiment_id
    runs_before = len(client.search_runs([experiment]))
    done = rlhf_run(pipeline_env, workdir, f"tracking.uri=sqlite:///{workdir}/mlflow.db")
    again = summary(workdir)
    assert done.stdout.startswith("up to date: this config, code and data completed at ")
    assert again["up_to_date"] is True and again["phases"] == dict.fromkeys(PHASES, "Up to date")
    assert {k: again[k] for k in first_run if k != "phases"} == {k: v for k, v in first_run.items() if k != "phases"}
    assert len(client.search_runs([experiment])) == runs_before  # no new MLflow run, nor a flow run
    assert sorted(p.as_posix() for p in Path(again["artifacts_uri"]).rglob("MANIFEST.json")) == before

    rlhf_run(pipeline_env, workdir, f"tracking.uri=sqlite:///{workdir}/mlflow.db", rerun=True)
    rerun = summary(workdir)
    assert rerun["phases"] == dict.fromkeys(PHASES, "Cached")
    assert rerun["iterations"] == first_run["iterations"]
    assert rerun["prefect_flow_run_id"] != first_run["prefect_flow_run_id"]
    assert sorted(p.as_posix() for p in Path(rerun["artifacts_uri"]).rglob("MANIFEST.json")) == before
    client = MlflowClient(rerun["mlflow_tracking_uri"])
    parent = client.get_run(rerun["mlflow_run_id"])
    recomputed = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert recomputed == []  # nothing was trained again, so no phase logged a run

    evaluation = next(Path(rerun["artifacts_uri"]).glob("iteration-002/evaluation-*"))
    shutil.rmtree(evaluation)  # something the run made is gone: the next run makes it again
    stale = rlhf_run(pipeline_env, workdir, f"tracking.uri=sqlite:///{workdir}/mlflow.db")
    assert stale.stdout.startswith("running: the run that did it has lost something: 1 of its artifacts are gone")
    assert summary(workdir)["phases"] == dict.fromkeys(PHASES[:-1], "Cached") | {PHASES[-1]: "Completed"}


def test_a_copied_run_folder_is_up_to_date_and_never_writes_into_the_original(pipeline_env: dict, tmp_path: Path):
    """``cp -r`` of a finished run's folder (its artifacts and its default MLflow store, rlhf-mlflow/): the same run
    in the copy is up to date, and a run there that logs writes into the copy's MLflow artifacts, not the original's
    (the SQLite store holds absolute artifact paths, re-pointed at the copy)."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    rlhf_run(pipeline_env, original, "iterations=1")
    shutil.copytree(original, copy)
    held = sorted(p.relative_to(original).as_posix() for p in original.rglob("*"))

    done = rlhf_run(pipeline_env, copy, "iterations=1")
    again = summary(copy)
    assert done.stdout.startswith("up to date: "), done.stdout[:300] + done.stderr[-2000:]
    assert f"MLflow store {copy.resolve()}/rlhf-mlflow/mlflow.db was copied or moved from {original.resolve()}" in (
        done.stderr.replace("\n", "")
    )
    assert again["up_to_date"] and again["mlflow_tracking_uri"] == f"sqlite:///{copy.resolve()}/rlhf-mlflow/mlflow.db"
    assert again["artifacts_uri"].startswith(str(copy.resolve()))

    rlhf_run(pipeline_env, copy, "iterations=1", rerun=True)  # a run that logs to MLflow
    rerun = summary(copy)
    client = MlflowClient(rerun["mlflow_tracking_uri"], rerun["mlflow_tracking_uri"])
    mine = (copy.resolve() / "rlhf-mlflow" / "mlartifacts").as_uri()
    assert client.get_run(rerun["mlflow_run_id"]).info.artifact_uri.startswith(mine)
    assert client.get_run(again["mlflow_run_id"]).info.artifact_uri.startswith(mine)  # the copied run's too
    versions = client.search_model_versions(f"name = '{rerun['registered_model']['name']}'")
    assert sorted(int(v.version) for v in versions) == [1, 2] and all(v.source.startswith(mine) for v in versions)
    assert sorted(p.relative_to(original).as_posix() for p in original.rglob("*")) == held  # the original untouched


def artifact_digests(root: Path) -> dict[str, str]:
    return {
        p.parent.relative_to(root).as_posix(): json.loads(p.read_text())["digest"] for p in root.rglob("MANIFEST.json")
    }


def test_an_artifact_does_not_depend_on_where_the_store_lives(
    first_run: dict, workdir: Path, pipeline_env: dict, tmp_path: Path
):
    """The same config in folder A, then B, then A again, then B moved: the same keys and digests in A and B, and
    the runs after the first in each place fully cached."""
    folder_b = tmp_path / "b"
    folder_b.mkdir()
    rlhf_run(pipeline_env, folder_b, f"tracking.uri=sqlite:///{folder_b}/mlflow.db")
    in_b = summary(folder_b)
    assert in_b["phases"] == dict.fromkeys(PHASES, "Completed")  # A's cache entries, but B's store is empty
    # each phase ran once in B: its Prefect cache key names B's store, so no cached stub of A's came first
    ran = task_run_names(pipeline_env, in_b["prefect_flow_run_id"])  # the phases, and the iterations' subflows
    assert [name for name in ran if not name.startswith("rlhf-iteration")] == ["prepare-data", "sft", "sft-baseline"]
    assert artifact_digests(Path(in_b["artifacts_uri"])) == artifact_digests(Path(first_run["artifacts_uri"]))
    assert in_b["final_policy_uri"].startswith(str(folder_b))

    rlhf_run(pipeline_env, workdir, f"tracking.uri=sqlite:///{workdir}/mlflow.db", rerun=True)
    assert summary(workdir)["phases"] == dict.fromkeys(PHASES, "Cached")
    moved = tmp_path / "moved"
    folder_b.rename(moved)
    rlhf_run(pipeline_env, moved, f"tracking.uri=sqlite:///{moved}/mlflow.db", rerun=True)
    assert summary(moved)["phases"] == dict.fromkeys(PHASES, "Cached")
    assert summary(moved)["final_policy_uri"].startswith(str(moved))  # the cached reference, in this store


def test_changing_a_ppo_setting_reruns_ppo_and_what_follows_only(first_run: dict, workdir: Path, pipeline_env: dict):
    # and an entropy floor no policy is under: the entropy alarm fires at step 2 of each PPO phase
    alarm = ["ppo.alarms.window=1", "ppo.alarms.entropy_floor=100"]
    rlhf_run(pipeline_env, workdir, f"tracking.uri=sqlite:///{workdir}/mlflow.db", "ppo.lr=0.0005", *alarm)
    result = summary(workdir)
    phases = result["phases"]
    cached = {"data", "sft", "sft-baseline", "iteration-1/preferences", "iteration-1/reward"}
    assert {name for name, state in phases.items() if state == "Cached"} == cached
    assert all(state == "Completed" for name, state in phases.items() if name not in cached)
    assert [(a["iteration"], a["alarm"], a["step"]) for a in result["alarms"]] == [
        (1, "entropy_collapse", 2),
        (2, "entropy_collapse", 2),
    ]
    client = MlflowClient(result["mlflow_tracking_uri"])
    [ppo_run] = client.search_runs(
        [client.get_run(result["mlflow_run_id"]).info.experiment_id],
        f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}' and tags.mlflow.runName = 'iteration-2/ppo'",
    )
    assert ppo_run.data.tags["rlhf.alarm.entropy_collapse"].startswith("step 2: entropy")
    assert ppo_run.data.metrics["ppo/alarm/entropy_collapse"] == 2


def test_dpo_pipeline_trains_no_reward_model_and_caches(first_run: dict, workdir: Path, pipeline_env: dict):
    """algorithm: dpo on the first run's store: the phases up to iteration 1's preferences are the PPO run's (cached),
    then DPO replaces reward model and PPO; evaluated and registered alike, and a rerun is fully cached."""
    dpo = ["algorithm=dpo", "dpo.epochs=1", "dpo.batch_size=8", "dpo.log_every=2"]
    rlhf_run(pipeline_env, workdir, f"tracking.uri=sqlite:///{workdir}/mlflow.db", *dpo)
    result = summary(workdir)
    shared = ["data", "sft", "sft-baseline", "iteration-1/preferences"]
    mine = ["iteration-1/dpo", "iteration-1/evaluation", "iteration-2/preferences", "iteration-2/dpo"]
    assert result["phases"] == dict.fromkeys(shared, "Cached") | dict.fromkeys(
        [*mine, "iteration-2/evaluation"], "Completed"
    )
    for row in result["iterations"]:
        assert 0 <= row["win_rate_vs_sft"] <= 1 and "rm_val_accuracy" not in row and "reward" not in row
    policy_key = result["final_policy_uri"].removeprefix(f"{workdir}/rlhf-artifacts/")
    manifest = json.loads((Path(result["final_policy_uri"]) / "MANIFEST.json").read_text())["metadata"]
    assert manifest["phase"] == "dpo" and manifest["parents"]["reference"].startswith("pipelines/default/sft/policy-")
    assert len(manifest["parents"]["preferences"]) == 2 and policy_key.startswith("pipelines/default/iteration-002/")
    client = MlflowClient(result["mlflow_tracking_uri"])
    [dpo_run] = client.search_runs(
        [client.get_run(result["mlflow_run_id"]).info.experiment_id],
        f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}' and tags.mlflow.runName = 'iteration-2/dpo'",
    )
    assert {"dpo/loss", "dpo/reward_accuracy", "dpo/reward_margin", "dpo/logratio_chosen"} <= set(dpo_run.data.metrics)
    assert result["registered_model"]["version"]

    rlhf_run(pipeline_env, workdir, f"tracking.uri=sqlite:///{workdir}/mlflow.db", *dpo, rerun=True)
    assert set(summary(workdir)["phases"].values()) == {"Cached"}

    # offline DPO against the previous policy, on the latest pairs: iteration 2 samples its pairs from the SFT model
    # and DPO starts from iteration 1's policy, which is also its reference
    offline = ["dpo.online=false", "dpo.reference=previous", "dpo.pairs=latest"]
    rlhf_run(pipeline_env, workdir, f"tracking.uri=sqlite:///{workdir}/mlflow.db", *dpo, *offline)
    result = summary(workdir)
    assert result["phases"]["iteration-1/preferences"] == "Cached"
    assert result["phases"]["iteration-2/dpo"] == "Completed"

    def metadata(key: str) -> dict:
        return json.loads((workdir / "rlhf-artifacts" / key / "MANIFEST.json").read_text())["metadata"]

    dpo_parents = metadata(result["final_policy_uri"].removeprefix(f"{workdir}/rlhf-artifacts/"))["parents"]
    assert dpo_parents["reference"] == dpo_parents["policy"]
    assert dpo_parents["reference"].startswith("pipelines/default/iteration-001/policy-")
    [pairs] = dpo_parents["preferences"]
    assert pairs.startswith("pipelines/default/iteration-002/preferences-")
    assert metadata(pairs)["parents"]["policy"].startswith("pipelines/default/sft/policy-")


def test_the_pipeline_runs_with_two_processes_under_deepspeed(tmp_path: Path, pipeline_env: dict):
    """deepspeed.num_processes: 2 — SFT, the reward model and PPO train as two torchrun ranks (rank 0 logging and
    writing); each phase's MLflow run says how many."""
    zero = "deepspeed={zero_stage: 2, num_processes: 2}"
    rlhf_run(pipeline_env, tmp_path, "iterations=1", zero, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    result = summary(tmp_path)
    assert set(result["phases"].values()) == {"Completed"}
    assert 0 <= result["iterations"][0]["rm_val_accuracy"] <= 1
    client = MlflowClient(result["mlflow_tracking_uri"])
    experiment = client.get_run(result["mlflow_run_id"]).info.experiment_id
    runs = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'")
    world_sizes = {run.info.run_name: run.data.params.get("world_size") for run in runs}
    assert world_sizes["sft"] == world_sizes["iteration-1/reward"] == world_sizes["iteration-1/ppo"] == "2"
    reward_run = next(run for run in runs if run.info.run_name == "iteration-1/reward")
    assert {"reward/loss", "reward/val_accuracy"} <= set(reward_run.data.metrics)  # rank 0's, through its run
    ppo_run = next(run for run in runs if run.info.run_name == "iteration-1/ppo")
    assert {"ppo/kl", "ppo/reward", "ppo/policy_loss"} <= set(ppo_run.data.metrics)


def test_bad_config_fails_before_anything_is_written(tmp_path: Path, pipeline_env: dict):
    for override, named in (
        ("ppo.kl_coeff=0.1", "ppo.kl_coeff"),
        ("sft.lr=-1", "sft.lr"),
        ("iterations=many", "iterations"),
        ("reward.batch_size=0", "reward.batch_size"),
    ):
        proc = rlhf_run(pipeline_env, tmp_path, override, check=False)
        assert proc.returncode == 2, proc.stderr
        assert named in proc.stdout + proc.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == [], "a rejected config wrote files"


def test_end_to_end_on_s3(tmp_path: Path, pipeline_env: dict, s3_endpoint: str, s3_bucket: str):
    env = pipeline_env | {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    rlhf_run(
        env,
        tmp_path,
        "iterations=1",
        f"storage.uri=s3://{s3_bucket}/rlhf",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    )
    result = summary(tmp_path)
    assert result["artifacts_uri"] == f"s3://{s3_bucket}/rlhf/pipelines/default"
    keys = [
        o["Key"]
        for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
        for o in page.get("Contents", [])
    ]
    folders = sorted(
        {k.rsplit("/", 1)[0].split("/", 3)[3].rsplit("-", 1)[0] for k in keys if k.endswith("MANIFEST.json")}
    )
    assert folders == [
        "data/world",
        "iteration-001/evaluation",
        "iteration-001/policy",
        "iteration-001/preferences",
        "iteration-001/reward_model",
        "sft/baseline",
        "sft/policy",
    ]
    assert any(
        k.startswith("rlhf/pipelines/default/iteration-001/preferences-") and k.endswith(".parquet") for k in keys
    )
    assert any(k.startswith("rlhf/pipelines/default/sft/policy-") and k.endswith("model.safetensors") for k in keys)
    assert not (tmp_path / "rlhf-artifacts").exists()
