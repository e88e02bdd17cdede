"""The RLHF pipeline as a Prefect flow: data -> SFT -> N x (preferences -> reward model -> PPO -> evaluation).

Each iteration is its own subflow run (``iteration-k``) in the Prefect UI; each phase is a cached,
retried task whose artifact lives in object storage. MLflow gets a parent run for the pipeline run
and a child run per phase and iteration.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.config import PipelineConfig
from infra.credentials import open_configured_store
from infra.datasets import read_rows
from infra.lineage import Lineage, LineagePointer
from infra.storage import is_complete
from infra.tracking import RunLogger, Tracker, default_tracking_uri, plot_iterations
from tasks.common import PhaseOutput, RunContext, TrackingContext, fetch
from tasks.data import check_data, local_inputs_digest, prepare_data
from tasks.evaluate import SAMPLES_FILE, evaluate_task
from tasks.ppo import ppo_task
from tasks.preferences import preferences_task
from tasks.reward import reward_task
from tasks.sft import sft_task

DEFAULT_TRACKING_ROOT = Path("./rlhf-mlflow")
SUMMARY_KEYS = ("win_rate_vs_sft", "gold_reward", "reward", "kl", "entropy", "response_length")
PLOT_KEYS = ["win_rate_vs_sft", "gold_reward", "reward", "kl", "entropy", "response_length"]


def run_phase(phase: Any, states: dict[str, str], label: str, **kwargs: Any) -> PhaseOutput:
    """Run a phase task and record whether Prefect served it from cache. A cached reference whose
    artifact has since vanished from the store is recomputed rather than trusted."""
    state = phase(**kwargs, return_state=True)
    output: PhaseOutput = state.result()
    if state.name == "Cached" and not is_complete(kwargs["context"].store, output.ref.key):
        get_run_logger().warning(f"{label}: cached artifact {output.ref.uri} is gone; recomputing")
        state = phase.with_options(refresh_cache=True)(**kwargs, return_state=True)
        output = state.result()
    states[label] = state.name
    return output


@flow(name="rlhf-iteration", flow_run_name="iteration-{iteration}", log_prints=True)
def iteration_flow(
    config: PipelineConfig,
    context: RunContext,
    data: PhaseOutput,
    sft: PhaseOutput,
    policy: PhaseOutput,
    preferences: list[PhaseOutput],
    iteration: int,
    reward: PhaseOutput | None = None,
) -> dict[str, Any]:
    """One RLHF iteration: preferences from the current policy, a reward model on all preferences so far
    (continuing from ``reward``, the last iteration's, with ``reward.warm_start``), PPO from the current policy
    against the SFT reference, and evaluation."""
    seed = config.seed * 1000 + iteration
    common = {"context": context, "seed": seed, "iteration": iteration}
    label = f"iteration-{iteration}"
    states: dict[str, str] = {}  # a subflow gets copies of its arguments, so it reports states back
    new_preferences = run_phase(
        preferences_task, states, f"{label}/preferences", data=data, policy=policy, config=config.preferences, **common
    )
    preferences = [*preferences, new_preferences]
    common_training = {**common, "deepspeed": config.deepspeed}
    reward = run_phase(
        reward_task,
        states,
        f"{label}/reward",
        data=data,
        sft=sft,
        preferences=preferences,
        previous=reward,
        config=config.reward,
        **common_training,
    )
    policy = run_phase(
        ppo_task,
        states,
        f"{label}/ppo",
        data=data,
        policy=policy,
        sft=sft,
        reward=reward,
        config=config.ppo,
        **common_training,
    )
    evaluation = run_phase(
        evaluate_task,
        states,
        f"{label}/evaluation",
        data=data,
        policy=policy,
        sft=sft,
        reward=reward,
        config=config.evaluation,
        **common,
    )
    return {
        "preferences": preferences,
        "reward": reward,
        "policy": policy,
        "evaluation": evaluation,
        "new_preferences": new_preferences,
        "states": states,
    }


def iteration_summary(iteration: int, outputs: dict[str, Any]) -> dict[str, float]:
    evaluation = outputs["evaluation"].metrics
    return {
        "iteration": iteration,
        **{key: evaluation[f"eval/{key}"] for key in SUMMARY_KEYS},
        "rm_val_accuracy": outputs["reward"].metrics["reward/val_accuracy"],
        "labeler_agreement": outputs["new_preferences"].metrics["preferences/labeler_agreement"],
    }


def log_iteration(parent: RunLogger, context: RunContext, summary: dict[str, float], evaluation: PhaseOutput) -> None:
    iteration = int(summary["iteration"])
    parent.log_metrics({f"iteration/{k}": v for k, v in summary.items() if k != "iteration"}, step=iteration)
    rows = read_rows(fetch(context, evaluation) / SAMPLES_FILE)
    parent.log_table(rows, f"samples/iteration_{iteration:03d}.json")


def check_inputs(config: PipelineConfig) -> None:
    """Read and check every user-supplied input (files, judge, base model's tokenizer) and reach the object
    store before anything is written: DatasetError or ValueError names the file, row and column, or the config
    field; StorageError the bucket and what to check (a missing bucket or denied access fails here, at once)."""
    check_data(config.data, config.seed, config.trust_remote_code, config.max_tokens)
    store = open_configured_store(config.storage.uri, config.storage.aws_credentials_block)
    store.exists(f"{config.storage.prefix}/.probe")


def open_lineage(config: PipelineConfig) -> Lineage | None:
    if not config.lineage:
        return None
    store = open_configured_store(config.storage.uri, config.storage.aws_credentials_block)
    return Lineage(store, config.storage.prefix, config.lineage)


@flow(name="rlhf-pipeline", log_prints=True)
def rlhf_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """SFT, then ``config.iterations`` rounds of preference collection, reward modeling, PPO and evaluation.

    With ``config.lineage``, the run holds the lineage's lock, continues from its pointer (reusing its data and
    SFT model, numbering iterations after its last one) and moves the pointer once all its iterations are done.
    """
    check_inputs(config)
    tracking_uri = config.tracking.uri or default_tracking_uri(DEFAULT_TRACKING_ROOT)
    tracker = Tracker(tracking_uri, config.experiment)
    flow_run_id = str(flow_run.get_id() or "")
    lineage = open_lineage(config)
    with (
        lineage.locked(flow_run_id) if lineage else nullcontext(),
        tracker.run(
            f"pipeline-{flow_run.get_name() or 'local'}",
            params=config.model_dump(mode="json"),
            tags={"prefect_flow_run_id": flow_run_id, "lineage": config.lineage or ""},
        ) as parent,
    ):
        context = RunContext(
            store_uri=config.storage.uri,
            prefix=config.storage.prefix,
            aws_credentials_block=config.storage.aws_credentials_block,
            trust_remote_code=config.trust_remote_code,
            tracking=TrackingContext(
                tracking_uri=tracking_uri, experiment=config.experiment, parent_run_id=parent.run_id
            ),
        )
        states: dict[str, str] = {}
        resumed = lineage.read() if lineage else None
        if resumed is None:
            data = run_phase(
                prepare_data,
                states,
                "data",
                context=context,
                config=config.data,
                seed=config.seed,
                inputs_digest=local_inputs_digest(config.data),
                max_tokens=config.max_tokens,
            )
            sft = run_phase(
                sft_task,
                states,
                "sft",
                context=context,
                data=data,
                config=config.sft,
                seed=config.seed,
                deepspeed=config.deepspeed,
            )
            human = data.metrics.get("data/human_preferences", 0) > 0  # the data artifact holds them
            policy, preferences, done = sft, [data] if human else [], 0
            reward = None
        else:
            data, sft, policy = (PhaseOutput.model_validate(o) for o in (resumed.data, resumed.sft, resumed.policy))
            preferences = [PhaseOutput.model_validate(o) for o in resumed.preferences]
            reward = PhaseOutput.model_validate(resumed.reward) if resumed.reward else None
            states |= {"data": "Reused", "sft": "Reused"}
            done = resumed.iteration
            print(f"lineage {config.lineage}: continuing after iteration {done} (flow run {resumed.flow_run_id})")
        history: list[dict[str, float]] = []
        sft_gold = None
        for iteration in range(done + 1, done + config.iterations + 1):
            outputs = iteration_flow(config, context, data, sft, policy, preferences, iteration, reward)
            states |= outputs["states"]
            policy, preferences, reward = outputs["policy"], outputs["preferences"], outputs["reward"]
            summary = iteration_summary(iteration, outputs)
            sft_gold = outputs["evaluation"].metrics["eval/sft_gold_reward"]
            log_iteration(parent, context, summary, outputs["evaluation"])
            history.append(summary)
            print(
                f"iteration {iteration}: " + ", ".join(f"{k}={v:.3f}" for k, v in summary.items() if k != "iteration")
            )
        parent.log_figure(
            plot_iterations(
                [{"iteration": 0, "gold_reward": sft_gold, "win_rate_vs_sft": 0.5, "kl": 0.0}, *history], PLOT_KEYS
            ),
            "plots/iterations.png",
        )
        parent.log_dict({"phases": states, "final_policy": policy.artifact}, "pipeline.json")
        if lineage is not None:
            lineage.advance(
                LineagePointer(
                    lineage=lineage.name,
                    iteration=done + config.iterations,
                    data=data.model_dump(),
                    sft=sft.model_dump(),
                    policy=policy.model_dump(),
                    preferences=[p.model_dump() for p in preferences],
                    reward=reward.model_dump() if reward is not None else None,
                    flow_run_id=flow_run_id,
                    mlflow_run_id=parent.run_id,
                )
            )
        return {
            "sft": {"gold_reward": sft_gold},
            "iterations": history,
            "lineage": config.lineage,
            "mlflow_tracking_uri": tracking_uri,
            "mlflow_run_id": parent.run_id,
            "prefect_flow_run_id": flow_run_id,
            "artifacts_uri": context.store.full_uri(config.storage.prefix),
            "final_policy_uri": policy.ref.uri,
            "phases": states,
        }
