"""The model registry (infra/registry.py) on a real SQLite-backed MLflow store: a logged model per iteration linked to
its run, a version per iteration, ``newest`` always moving, ``champion`` only on improvement."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException

from infra.registry import (
    CHAMPION,
    NEWEST,
    TAG_WEIGHTS,
    ModelLine,
    PolicyLocation,
    find_version,
    log_policy_model,
    register_iteration,
)
from infra.tracking import Tracker
from rlhf_core import world


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Tracker:
    root = tmp_path_factory.mktemp("registry")
    return Tracker(f"sqlite:///{root}/mlflow.db", "registry-test")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("policy")
    tokenizer = world.build_tokenizer()
    world.build_model(tokenizer, world.WorldConfig(hidden_size=16, num_layers=1, num_heads=2)).save_pretrained(
        directory
    )
    tokenizer.save_pretrained(directory)
    (directory / "MANIFEST.json").write_text("{}")  # the store's bookkeeping: never part of the model
    return directory


def register(
    tracker: Tracker,
    policy_dir: Path,
    name: str,
    iteration: int,
    win_rate: float,
    *,
    max_mb: float = 100,
    stderr: float | None = None,
):
    with tracker.run("pipeline") as parent, tracker.run("ppo", parent_run_id=parent.run_id) as ppo:
        model = log_policy_model(
            tracker.client,
            tracker.experiment_id,
            policy_dir=policy_dir,
            location=PolicyLocation("file:///store/policy", "policy", "d1g3st"),
            iteration=iteration,
            source_run_id=ppo.run_id,
            pipeline_run_id=parent.run_id,
            copy_weights_max_mb=max_mb,
        )
        parent.log_metrics({"iteration/win_rate_vs_sft": win_rate}, step=iteration, model_id=model.model_id)
        registration = register_iteration(
            tracker.client,
            line=ModelLine(name, "0" * 64, {"data": "test"}),
            model=model,
            run_id=parent.run_id,
            iteration=iteration,
            metrics={"win_rate_vs_sft": win_rate, "kl": 0.1} | ({} if stderr is None else {"win_rate_stderr": stderr}),
            champion_metric="win_rate_vs_sft",
        )
    return model, registration, ppo.run_id


def test_champion_moves_only_when_an_iteration_beats_it(tracker: Tracker, policy_dir: Path) -> None:
    client, name = tracker.client, "rlhf-champion-test"
    expected = [  # (win rate, champion version after it, alias of the new version)
        (0.70, "1", CHAMPION),
        (0.60, "1", NEWEST),  # worse: champion stays
        (0.70, "1", NEWEST),  # a tie is not an improvement
        (0.80, "4", CHAMPION),
    ]
    for iteration, (win_rate, champion, alias) in enumerate(expected, start=1):
        _, registration, _ = register(tracker, policy_dir, name, iteration, win_rate)
        assert registration.version == str(iteration) and registration.alias == alias
        assert str(client.get_model_version_by_alias(name, NEWEST).version) == str(iteration)
        assert str(client.get_model_version_by_alias(name, CHAMPION).version) == champion
        summary = registration.summary()
        assert summary["registered_model"] == {"name": name, "version": str(iteration), "alias": alias}
        champion_iteration = int(champion)  # versions and iterations coincide here
        assert summary["champion"] == {
            "name": name,
            "version": champion,
            "iteration": champion_iteration,
            "metric": "win_rate_vs_sft",
            "value": expected[champion_iteration - 1][0],
        }
    assert str(find_version(client, name, alias=CHAMPION).version) == "4"
    assert str(find_version(client, name, iteration=2).version) == "2"
    with pytest.raises(LookupError, match="no version for iteration 9"):
        find_version(client, name, iteration=9)
    version_3 = client.get_model_version(name, "3")
    assert find_version(client, name, run_id=version_3.run_id).version == version_3.version
    with pytest.raises(LookupError, match=f"no version from run {version_3.run_id} for iteration 2"):
        find_version(client, name, iteration=2, run_id=version_3.run_id)
    with pytest.raises(LookupError, match="run elsewhere registered no version"):
        find_version(client, name, run_id="elsewhere")


def test_champion_moves_only_by_more_than_the_standard_error(tracker: Tracker, policy_dir: Path) -> None:
    """A policy that beats the champion by less than the standard error of the difference (here 0.03 on each side:
    0.042) may have won by the draw of its evaluation: the champion stays."""
    client, name = tracker.client, "rlhf-noise-test"
    for iteration, win_rate, champion in [(1, 0.70, "1"), (2, 0.74, "1"), (3, 0.75, "3")]:
        _, registration, _ = register(tracker, policy_dir, name, iteration, win_rate, stderr=0.03)
        assert str(client.get_model_version_by_alias(name, CHAMPION).version) == champion, iteration
        assert registration.champion_version == champion


def test_logged_model_is_linked_to_its_run_and_carries_the_metrics(tracker: Tracker, policy_dir: Path) -> None:
    model, _, ppo_run_id = register(tracker, policy_dir, "rlhf-link-test", 1, 0.6)
    logged = tracker.client.get_logged_model(model.model_id)
    assert logged.source_run_id == ppo_run_id and logged.status == LoggedModelStatus.READY
    assert [(m.key, m.value) for m in logged.metrics] == [("iteration/win_rate_vs_sft", 0.6)]
    files = {a.path for a in tracker.client.list_logged_model_artifacts(model.model_id)}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files and "MANIFEST.json" not in files
    assert logged.tags[TAG_WEIGHTS] == "in MLflow"


def test_a_policy_over_the_size_limit_is_logged_without_weights(tracker: Tracker, policy_dir: Path) -> None:
    model, _, _ = register(tracker, policy_dir, "rlhf-big-test", 1, 0.6, max_mb=0)
    files = {a.path for a in tracker.client.list_logged_model_artifacts(model.model_id)}
    assert "config.json" in files and not any(f.endswith(".safetensors") for f in files)
    version = find_version(tracker.client, "rlhf-big-test", alias=CHAMPION)
    assert version.tags["rlhf.policy_uri"] == "file:///store/policy"  # where rlhf export finds the weights
    assert tracker.client.get_logged_model(model.model_id).tags[TAG_WEIGHTS] == "in the object store only"


def test_an_unknown_champion_metric_names_the_setting(tracker: Tracker, policy_dir: Path) -> None:
    with tracker.run("pipeline") as parent:
        model = log_policy_model(
            tracker.client,
            tracker.experiment_id,
            policy_dir=policy_dir,
            location=PolicyLocation("file:///p", "p", "d"),
            iteration=1,
            source_run_id="no-such-run",  # e.g. a cached policy trained under another tracking server: no link
            pipeline_run_id=parent.run_id,
            copy_weights_max_mb=0,
        )
        assert tracker.client.get_logged_model(model.model_id).source_run_id is None
        with pytest.raises(ValueError, match="tracking.champion_metric='human_win_rate_vs_sft'"):
            register_iteration(
                tracker.client,
                line=ModelLine("rlhf-bad-metric", "1" * 64, {"data": "test"}),
                model=model,
                run_id=parent.run_id,
                iteration=1,
                metrics={"win_rate_vs_sft": 0.5},
                champion_metric="human_win_rate_vs_sft",
            )
    with pytest.raises(MlflowException):
        tracker.client.get_registered_model("rlhf-bad-metric")  # nothing half-registered
