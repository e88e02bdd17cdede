"""The RLHF pipeline as a Prefect flow: data -> SFT -> N x (preferences -> reward model -> PPO -> evaluation).

Each iteration is its own subflow run (``iteration-k``) in the Prefect UI; each phase is a cached,
retried task whose artifact lives in object storage. MLflow gets a parent run for the pipeline run
and a child run per phase and iteration (``infra/catalog.py`` lists everything logged).
"""

from __future__ import annotations

from contextlib import nullcontext
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows import publishing
from flows.config import PipelineConfig
from flows.done import record_run, source_store_opener
from flows.labeling import wait_for_labels
from flows.limits import check_lengths
from infra import catalog
from infra.artifacts import PAIRS_FILE, SAMPLES_FILE
from infra.credentials import open_configured_store
from infra.datasets import read_rows
from infra.deepspeed_engine import quiet_unused_deepspeed
from infra.lineage import Lineage, LineagePointer
from infra.mlflow_links import mlflow_run_url
from infra.registry import ModelLine, Registration
from infra.sources import inputs_digest
from infra.storage import ObjectStore, is_complete, store_identity
from infra.tracking import RunLogger, Tracker
from infra.user_data import base_tokenizer, check_data
from tasks.common import PhaseOutput, RunContext, TrackingContext, fetch
from tasks.data import prepare_data
from tasks.dpo import dpo_task
from tasks.evaluate import evaluate_task, evaluation_batch_task, human_evaluation_task, sft_baseline_task
from tasks.ppo import ppo_task
from tasks.preferences import human_preferences_task, labeling_batch_task, preferences_task
from tasks.reward import reward_task
from tasks.sft import sft_task


class PipelineState(BaseModel):
    """Where a pipeline stands between iterations: what the next iteration starts from."""

    data: PhaseOutput
    sft: PhaseOutput  # the KL reference, and where reward models start without a backbone of their own
    policy: PhaseOutput
    preferences: list[PhaseOutput]  # every preference dataset so far, oldest first
    reward: PhaseOutput | None = None  # the last reward model, where the next one starts (reward.warm_start)
    iteration: int = 0  # the last completed iteration


class IterationResult(BaseModel):
    """One iteration's outcome: the state after it, its evaluation and preferences, and how each phase ran."""

    state: PipelineState
    evaluation: PhaseOutput
    human_evaluation: PhaseOutput | None = None  # with evaluation.human_pairs
    new_preferences: PhaseOutput
    phases: dict[str, str]  # label -> Completed, Cached, ...


def run_phase(phase: Any, phases: dict[str, str], label: str, **kwargs: Any) -> PhaseOutput:
    """Run a phase task and record whether Prefect served it from cache. Cache keys leave out where the store lives,
    so a cached reference is looked up by its key in this run's store: found, it is used (its URI this store's); not
    there (made in another store, or deleted since), the phase runs here."""
    state = phase(**kwargs, return_state=True)
    output: PhaseOutput = state.result()
    store = kwargs["context"].store
    if state.name == "Cached" and not is_complete(store, output.ref.key):
        get_run_logger().info(
            f"{label}: Prefect's cache knows this phase's artifact {output.ref.key}, but {store.uri} does not hold it "
            "(it was made in another store, or removed): computing it here"
        )
        state = phase.with_options(refresh_cache=True)(**kwargs, return_state=True)
        output = state.result()
    elif state.name == "Cached":
        output = output.model_copy(update={"artifact": output.artifact | {"uri": store.full_uri(output.ref.key)}})
    phases[label] = state.name
    return output


def preferences_phase(
    config: PipelineConfig, state: PipelineState, phases: dict[str, str], **common: Any
) -> PhaseOutput:
    """The iteration's preferences on pairs sampled from the current policy (from the SFT model for offline DPO):
    from the simulated labelers, or from people, for whom the run publishes a labeling batch and waits
    (flows/labeling.py). ``common``: context, seed and iteration."""
    sampler = state.sft if config.algorithm == "dpo" and not config.dpo.online else state.policy
    label, inputs = f"iteration-{common['iteration']}", {"data": state.data, "policy": sampler}
    inputs["compute"] = config.compute
    if config.preferences.source == "simulated":
        return run_phase(
            preferences_task, phases, f"{label}/preferences", config=config.preferences, **inputs, **common
        )
    batch = run_phase(
        labeling_batch_task, phases, f"{label}/labeling-batch", config=config.preferences, **inputs, **common
    )
    labels = wait_for_labels(
        common["context"], batch, config.preferences, iteration=common["iteration"], lineage=config.lineage
    )
    return run_phase(
        human_preferences_task,
        phases,
        f"{label}/preferences",
        batch=batch,
        labels=labels,
        config=config.preferences,
        **common,
    )


def human_evaluation_phase(
    config: PipelineConfig, evaluation: PhaseOutput, phases: dict[str, str], **common: Any
) -> PhaseOutput | None:
    """With ``evaluation.human_pairs``, people judge that many blind (policy, SFT) pairs: the human win rate."""
    if not config.evaluation.human_pairs:
        return None
    label, iteration = f"iteration-{common['iteration']}", common["iteration"]
    batch = run_phase(
        evaluation_batch_task,
        phases,
        f"{label}/evaluation-batch",
        evaluation=evaluation,
        config=config.evaluation,
        **common,
    )
    labels = wait_for_labels(
        common["context"], batch, config.preferences, iteration=iteration, lineage=config.lineage, kind="evaluation"
    )
    return run_phase(
        human_evaluation_task,
        phases,
        f"{label}/human-evaluation",
        batch=batch,
        labels=labels,
        config=config.evaluation,
        **common,
    )


@flow(name="rlhf-iteration", flow_run_name="iteration-{iteration}", log_prints=True)
def iteration_flow(
    config: PipelineConfig, context: RunContext, state: PipelineState, iteration: int, *, baseline: PhaseOutput
) -> IterationResult:
    """One RLHF iteration: preferences from the current policy, then the policy phase and evaluation. With PPO, a
    reward model on all preferences so far (continuing from the last one with ``reward.warm_start``) and PPO from
    the current policy against it and the SFT reference; with DPO, DPO on the preference pairs (no reward model)."""
    common = {"context": context, "seed": config.seed * 1000 + iteration, "iteration": iteration}
    label, phases = f"iteration-{iteration}", {}  # a subflow gets copies of its arguments: it reports back
    new_preferences = preferences_phase(config, state, phases, **common)
    preferences = [*state.preferences, new_preferences]
    if config.algorithm == "dpo":
        reward = None
        policy = run_phase(
            dpo_task,
            phases,
            f"{label}/dpo",
            policy=state.policy,
            sft=state.sft,
            preferences=preferences if config.dpo.pairs == "all" else [new_preferences],
            config=config.dpo,
            deepspeed=config.deepspeed,
            compute=config.compute,
            **common,
        )
    else:
        reward = run_phase(
            reward_task,
            phases,
            f"{label}/reward",
            data=state.data,
            sft=state.sft,
            preferences=preferences,
            previous=state.reward,
            config=config.reward,
            deepspeed=config.deepspeed,
            compute=config.compute,
            **common,
        )
        policy = run_phase(
            ppo_task,
            phases,
            f"{label}/ppo",
            data=state.data,
            policy=state.policy,
            sft=state.sft,
            reward=reward,
            config=config.ppo,
            deepspeed=config.deepspeed,
            compute=config.compute,
            **common,
        )
    evaluation = run_phase(
        evaluate_task,
        phases,
        f"{label}/evaluation",
        data=state.data,
        policy=policy,
        sft=state.sft,
        baseline=baseline,
        reward=reward,
        config=config.evaluation,
        compute=config.compute,
        **common,
    )
    human_evaluation = human_evaluation_phase(config, evaluation, phases, **common)
    after = state.model_copy(
        update={"policy": policy, "preferences": preferences, "reward": reward, "iteration": iteration}
    )
    return IterationResult(
        state=after,
        evaluation=evaluation,
        human_evaluation=human_evaluation,
        new_preferences=new_preferences,
        phases=phases,
    )


def check_inputs(config: PipelineConfig) -> Tracker:
    """Read and check every user-supplied input (files, judge, base model's tokenizer) and reach the object
    store before anything is written, and the token budgets against the models (:func:`check_lengths`):
    DatasetError or ValueError names the file, row and column, or the config field; StorageError the bucket and
    what to check (a missing bucket or denied access fails here, at once). Last, it opens the MLflow experiment,
    which makes a local tracking store's database on first use (the CLI checks while Prefect's temporary server
    starts), and returns it: the run's tracker."""
    tokenizer = base_tokenizer(config.data, config.trust_remote_code)
    dataset = check_data(
        config.data,
        config.seed,
        config.trust_remote_code,
        config.max_tokens,
        open_store=source_store_opener(config),
        tokenizer=tokenizer,
    )
    prompts = [p for split in dataset.prompts.values() for p in split] + [row["prompt"] for row in dataset.preferences]
    check_lengths(config, prompts, tokenizer)
    store = open_configured_store(config.storage.uri, config.storage.aws_credentials_block)
    store.exists(f"{config.storage.prefix}/.probe")
    return Tracker(config.tracking.resolved_uri(), config.experiment)


def open_lineage(config: PipelineConfig, store: ObjectStore) -> Lineage | None:
    return Lineage(store, config.storage.prefix, config.lineage) if config.lineage else None


def start_or_resume(
    config: PipelineConfig, context: RunContext, lineage: Lineage | None, phases: dict[str, str], *, inputs: str | None
) -> PipelineState:
    """The lineage's state where it has one; else data and SFT, the first iteration starting from the SFT model
    (``inputs``: the digest of what the data phase reads, :func:`infra.sources.inputs_digest`)."""
    resumed = lineage.read() if lineage else None
    if resumed is not None:
        phases |= {"data": "Reused", "sft": "Reused"}
        print(
            f"lineage {config.lineage}: continuing after iteration {resumed.iteration} (flow run {resumed.flow_run_id})"
        )
        return PipelineState.model_validate(resumed.model_dump(include=set(PipelineState.model_fields)))
    data = run_phase(
        prepare_data,
        phases,
        "data",
        context=context,
        config=config.data,
        seed=config.seed,
        inputs_digest=inputs,
        max_tokens=config.max_tokens,
    )
    sft = run_phase(
        sft_task,
        phases,
        "sft",
        context=context,
        data=data,
        config=config.sft,
        seed=config.seed,
        deepspeed=config.deepspeed,
        compute=config.compute,
    )
    human = data.metrics.get(catalog.DATA.key("human_preferences"), 0) > 0  # the data artifact holds them
    return PipelineState(data=data, sft=sft, policy=sft, preferences=[data] if human else [])


def record_iteration(
    tracker: Tracker,
    parent: RunLogger,
    *,
    context: RunContext,
    result: IterationResult,
    config: PipelineConfig,
    line: ModelLine,
) -> tuple[dict[str, float], Registration]:
    """The iteration's policy logged and registered, its summary row and sample completions logged to the pipeline
    run, its preferences as an input, and its Prefect artifacts."""
    iteration = result.state.iteration
    registration = publishing.register_policy(tracker, parent, context=context, result=result, config=config, line=line)
    row, _ = publishing.iteration_metrics(result)
    samples = read_rows(fetch(context, result.evaluation) / SAMPLES_FILE)[: config.evaluation.n_samples_logged]
    parent.log_table(samples, catalog.SAMPLES_ARTIFACT.format(iteration=iteration))
    preferences = publishing.datasets_of(
        context.store, result.new_preferences, {PAIRS_FILE: f"preferences-iteration-{iteration}"}, context="training"
    )
    tracker.log_datasets(parent.run_id, preferences)
    print(f"iteration {iteration}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items()))
    return {"iteration": iteration, **row}, registration


def finish(
    tracker: Tracker,
    parent: RunLogger,
    *,
    lineage: Lineage | None,
    state: PipelineState,
    registration: Registration,
    artifacts_uri: str,
) -> None:
    """Tag the run with where its model is, publish its report, and move the lineage's pointer, the run's last
    write."""
    parent.set_tags(publishing.final_tags(registration, artifacts_uri=artifacts_uri, policy_uri=state.policy.ref.uri))
    publishing.publish_report(tracker, parent, registration.name)
    if lineage is not None:
        pointer = state.model_dump(mode="json") | {"lineage": lineage.name, "flow_run_id": str(flow_run.get_id() or "")}
        lineage.advance(LineagePointer.model_validate(pointer | {"mlflow_run_id": parent.run_id}))


def pipeline_flow_run_name() -> str:
    """The lineage (``rlhf`` without one) and the UTC start time: ``nightly-2026-12-02T03-00``."""
    config = flow_run.parameters.get("config")
    lineage = config.get("lineage") if isinstance(config, dict) else getattr(config, "lineage", None)
    return f"{lineage or 'rlhf'}-{datetime.now(UTC):%Y-%m-%dT%H-%M}"


@flow(name="rlhf-pipeline", flow_run_name=pipeline_flow_run_name, log_prints=True)
def rlhf_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """SFT, then ``config.iterations`` rounds of preference collection, reward modeling, PPO and evaluation.

    With ``config.lineage``, the run holds the lineage's lock, continues from its pointer (reusing its data and
    SFT model, numbering iterations after its last one) and moves the pointer once all its iterations are done.
    """
    if config.deepspeed is None:
        quiet_unused_deepspeed()
    tracker = check_inputs(config)
    tracking_uri = tracker.tracking_uri
    store = open_configured_store(config.storage.uri, config.storage.aws_credentials_block)  # the lineage's, its id
    flow_run_id, lineage = str(flow_run.get_id() or ""), open_lineage(config, store)
    tags = publishing.run_tags(flow_run_id, flow_run.ui_url, config.lineage)
    with (
        lineage.locked(flow_run_id) if lineage else nullcontext(),
        tracker.run(
            catalog.pipeline_run_name(flow_run.get_name()), params=config.model_dump(mode="json"), tags=tags
        ) as parent,
    ):
        parent.log_dict(config.model_dump(mode="json"), catalog.CONFIG_ARTIFACT)
        context = RunContext(
            store_uri=config.storage.uri,
            prefix=config.storage.prefix,
            aws_credentials_block=config.storage.aws_credentials_block,
            trust_remote_code=config.trust_remote_code,
            store_id=store_identity(store, config.storage.prefix),
            tracking=TrackingContext(
                tracking_uri=tracking_uri,
                experiment=config.experiment,
                parent_run_id=parent.run_id,
                system_metrics_interval=config.tracking.system_metrics_interval,
            ),
        )
        phases: dict[str, str] = {}
        inputs = inputs_digest(config.data, source_store_opener(config))
        line = publishing.model_line(config, inputs)
        state = start_or_resume(config, context, lineage, phases, inputs=inputs)
        tracker.log_datasets(parent.run_id, publishing.data_datasets(context.store, state.data))
        baseline = run_phase(  # iteration 0's seed: the SFT model's responses, the same for every iteration
            sft_baseline_task,
            phases,
            "sft-baseline",
            context=context,
            data=state.data,
            sft=state.sft,
            config=config.evaluation,
            seed=config.seed * 1000,
            compute=config.compute,
        )
        artifacts_uri = context.store.full_uri(config.storage.prefix)
        run_url = (
            mlflow_run_url(tracking_uri, tracker.experiment_id, parent.run_id) or f"{tracking_uri}#{parent.run_id}"
        )
        history, alarms, made = [], [], [state.data, state.sft, baseline]
        for iteration in range(state.iteration + 1, state.iteration + config.iterations + 1):
            result = iteration_flow(config, context, state, iteration, baseline=baseline)
            state, phases = result.state, phases | result.phases
            made += [result.new_preferences, state.reward, state.policy, result.evaluation, result.human_evaluation]
            alarms += publishing.alarms_of(iteration, state.policy)
            row, registration = record_iteration(
                tracker, parent, context=context, result=result, config=config, line=line
            )
            history.append(row)
            publishing.iteration_artifacts(
                line=line.name,
                history=history,
                samples=read_rows(fetch(context, result.evaluation) / SAMPLES_FILE),
                mlflow_url=run_url,
                policy_uri=state.policy.ref.uri,
                registration=registration,
            )
        parent.log_dict({"phases": phases, "final_policy": state.policy.artifact}, catalog.PIPELINE_ARTIFACT)
        finish(tracker, parent, lineage=lineage, state=state, registration=registration, artifacts_uri=artifacts_uri)
        summary = {
            "sft": {"gold_reward": history[-1]["sft_gold_reward"]},
            "iterations": history,
            "lineage": config.lineage,
            "mlflow_tracking_uri": tracking_uri,
            "mlflow_experiment_id": tracker.experiment_id,
            "mlflow_run_id": parent.run_id,
            "prefect_flow_run_id": flow_run_id,
            "artifacts_uri": artifacts_uri,
            "final_policy_uri": state.policy.ref.uri,
            "final_policy_key": state.policy.ref.key,
            **registration.summary(),
            "alarms": alarms,
            "phases": phases,
        }
    keys = list(dict.fromkeys(output.ref.key for output in made if output is not None))
    record_run(config, inputs=inputs, summary=summary, artifacts=keys)
    return summary
