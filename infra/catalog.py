"""Everything the pipeline writes to MLflow, in one place: its runs, their metrics (each with what it means),
params, tags and artifacts.

The algorithms in ``rlhf_core`` report bare names (``kl``, ``loss``); the tasks log them through
:meth:`Phase.namespaced`, which puts each in its phase's namespace (``ppo/kl``) and refuses a name this module
does not list, so the list below is the whole list.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

_PLACEHOLDER = re.compile(r"\\\{\w+\\\}")  # an escaped "{name}" in a pattern
_NOT_IN_A_KEY = re.compile(r"[^\w\-. /]")  # MLflow keys: letters, digits, _ - . space /


@dataclass(frozen=True)
class Phase:
    """One phase's MLflow run (a child of the pipeline run) and the metrics it logs as ``<namespace>/<name>``."""

    namespace: str
    run_name: str  # ``{iteration}`` is filled in for the phases that run once per iteration
    metrics: Mapping[str, str]  # bare name -> what it means; ``{labeler}``-style parts stand for any name

    @cached_property
    def _patterns(self) -> list[re.Pattern[str]]:
        return [re.compile(_PLACEHOLDER.sub("[^/]+", re.escape(name))) for name in self.metrics if "{" in name]

    def key(self, name: str) -> str:
        """The logged name of one metric: ``ppo/kl``; characters MLflow does not take become ``_``."""
        if name not in self.metrics and not any(p.fullmatch(name) for p in self._patterns):
            raise KeyError(f"metric {name!r} of phase {self.namespace!r} is not listed in infra/catalog.py")
        return _NOT_IN_A_KEY.sub("_", f"{self.namespace}/{name}")

    def namespaced(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Bare names to logged names, every one checked against this phase's list."""
        return {self.key(name): float(value) for name, value in metrics.items()}

    def run(self, iteration: int | None = None) -> str:
        return self.run_name.format(iteration=iteration)


_OPTIMIZER = {
    "grad_norm": "Gradient norm before clipping.",
    "lr": "Learning rate after this step's scheduler update.",
    "loss_scale": "fp16 loss scale after this step (compute.autocast: fp16); it halves on a step whose gradients "
    "overflowed, which is skipped.",
}

DATA = Phase(
    "data",
    "",  # no MLflow run: these are the data artifact's recorded counts
    {
        "demonstrations": "SFT demonstrations in the data artifact.",
        "eval_prompts": "Held-out evaluation prompts.",
        "human_preferences": "Human preference pairs given with data.human_preferences.",
    },
)

SFT = Phase(
    "sft",
    "sft",
    {
        "loss": "Mean next-token loss on response tokens over the last sft.log_every steps (step metric).",
        "epoch": "Pass over the demonstrations, from 0 (step metric).",
        **_OPTIMIZER,
        "first_loss": "Loss of the first batch.",
        "final_loss": "Mean loss over the last sft.log_every steps.",
        "steps": "Optimizer steps taken.",
    },
)

PREFERENCES = Phase(
    "preferences",
    "iteration-{iteration}/preferences",
    {
        "labeler_agreement": "Share of pairs on which two labelers agree, averaged over labeler pairs.",
        "labeler_kappa": "Cohen's kappa of two labelers, averaged over labeler pairs.",
        "noise_scale": "Shared noise of the simulated labelers, calibrated to preferences.target_agreement on the "
        "pairs the gold judge decides.",
        "noise_at_limit": "1 when calibration ended at the edge of the noise scales it searches: the labelers cannot "
        "agree as often as preferences.target_agreement asks on these pairs (else 0).",
        "gold_per_word": "The gold reward's standard deviation per standard deviation of word count over the pairs: "
        "the unit of the labelers' length_bias.",
        "gold_tie_rate": "Share of sampled pairs the gold judge scores alike: no preference for the labelers to find.",
        "dropped_gold_ties": "Pairs the gold judge scores alike, dropped (preferences.gold_ties: drop).",
        "n_pairs": "Labeled pairs kept (for human labels: one per label that is not a tie).",
        "batch_pairs": "Pairs in the labeling batch people were given.",
        "dropped_identical": "Sampled pairs dropped because both responses were the same.",
        "label_gold_accuracy": "Share of labels that agree with the gold reward (pairs with equal gold left out).",
        # human labels
        "n_labels": "Human labels received (several per pair where labelers overlap).",
        "n_labelers": "Distinct labelers.",
        "tie_rate": "Share of human labels that call the pair a tie (left out of training).",
        "overlap_pairs": "Pairs labeled by more than one labeler.",
        "pair_agreement": "On pairs with several labels: share of labeler pairs that agree, averaged over pairs.",
        "unlabeled_pairs": "Pairs of the batch nobody labeled (left out).",
        "kappa/{labeler}/{other}": "Cohen's kappa of two labelers on the pairs both labeled.",
        "labeler/{labeler}/labels": "Labels this labeler gave.",
        "labeler/{labeler}/majority_agreement": "Share of this labeler's labels that match the other labelers' "
        "majority (pairs where they have one): InstructGPT's calibration signal.",
        "labeler/{labeler}/gold_agreement": "Share of this labeler's labels that match the gold reward.",
    },
)

REWARD = Phase(
    "reward",
    "iteration-{iteration}/reward",
    {
        "loss": "Bradley-Terry loss over the steps since the last validation (step metric).",
        "val_accuracy": "Share of validation pairs the reward model orders as the labelers did.",
        "val_accuracy_strength_{level}": "The same, on pairs a person labeled with this strength (1-4), as Llama 2 "
        "reports it.",
        "val_gold_accuracy": "Share of validation pairs the reward model orders as the gold reward does.",
        "first_loss": "Loss of the first batch.",
        "final_loss": "Mean loss over the last validation interval.",
        "steps": "Optimizer steps taken.",
        "train_pairs": "Training pairs (all preferences so far, less the validation share).",
        "stopped_early": "1 when validation accuracy stopped improving before reward.max_epochs.",
        "ensemble_val_accuracy": "Share of validation pairs the ensemble's aggregate reward orders as the labelers "
        "did (reward.ensemble_size > 1; val_accuracy is the first member's).",
        "ensemble_disagreement": "Standard deviation of the members' normalized scores of the current policy's "
        "samples, mean (reward.ensemble_size > 1).",
        "reward_gain": "Output gain that normalizes scores on the current policy's samples to std 1.",
        "reward_bias": "Output bias that normalizes those scores to mean 0.",
    },
)

PPO = Phase(
    "ppo",
    "iteration-{iteration}/ppo",
    {
        "kl": "KL to the SFT reference, nats per response (ppo.kl_estimator), mean over the rollout batch.",
        "reward": "Reward-model score of the rollouts (normalized units).",
        "score": "Reward-model score less the missing-EOS penalty: what PPO maximizes besides the KL term.",
        "non_score_reward": "Sum of the per-token KL penalties per response, mean over the batch.",
        "gold_reward": "Gold reward of the rollouts (where a gold judge is known).",
        "entropy": "Per-token entropy of the policy on its rollouts.",
        "response_length": "Response tokens, mean over the batch.",
        "response_length_p95": "Response tokens, 95th percentile.",
        "eos_rate": "Share of responses that end with EOS within ppo.max_new_tokens.",
        "explained_variance": "How much of the returns' variance the critic's values explain (1 is perfect).",
        "rm_disagreement": "Standard deviation of the reward-ensemble members' scores of a rollout, mean over the "
        "batch (reward.ensemble_size > 1): rising, the policy is going where the reward models do not agree.",
        "kl_coef": "KL coefficient used for this step (adaptive with ppo.adaptive_kl).",
        "policy_loss": "Clipped surrogate loss, mean over the update's minibatches.",
        "value_loss": "Clipped value loss, mean over the update's minibatches.",
        "clipfrac": "Share of tokens whose probability ratio was clipped.",
        "value_clipfrac": "Share of tokens whose value prediction was clipped.",
        "approx_kl": "k3 estimate of KL(rollout policy || updated policy), mean over minibatches.",
        "early_stopped": "1 when the update stopped at ppo.target_kl.",
        "minibatch_updates": "Optimizer steps the update took.",
        "alarm/{name}": "The step at which a training-health alarm first fired (length_hacking, entropy_collapse, "
        "reward_exploitation: rlhf_core/alarms.py), logged once at the phase's end; absent: it never fired.",
    },
)

DPO = Phase(
    "dpo",
    "iteration-{iteration}/dpo",
    {
        "loss": "DPO (or IPO) loss, mean over the steps since the last report.",
        "rewards_chosen": "Implicit reward beta * log(policy / reference) of the chosen responses, mean.",
        "rewards_rejected": "The same for the rejected responses.",
        "reward_margin": "Implicit reward of the chosen response less the rejected one's, mean.",
        "reward_accuracy": "Share of pairs whose chosen response has the higher implicit reward.",
        "logratio_chosen": "log(policy / reference) of the chosen responses (per token with dpo.loss_type ipo), mean: "
        "how far the policy moved from its reference on preferred text.",
        "logratio_rejected": "The same for the rejected responses.",
        "logps_chosen": "The policy's log-probability of the chosen responses, mean.",
        "logps_rejected": "The same for the rejected responses.",
        "steps": "Optimizer steps taken.",
        "train_pairs": "Preference pairs trained on (dpo.pairs: every iteration's, or the latest).",
        **_OPTIMIZER,
    },
)

EVALUATION = Phase(
    "eval",
    "iteration-{iteration}/evaluation",
    {
        "win_rate_vs_sft": "Share of matched (policy, SFT baseline) response pairs on held-out prompts where the "
        "policy's beats the SFT model's by gold reward (ties count one half); the baseline is sampled once per run.",
        "win_rate_stderr": "Standard error of win_rate_vs_sft over prompts (a prompt's samples averaged first).",
        "gold_reward": "Gold reward of the policy's responses.",
        "sft_gold_reward": "Gold reward of the SFT model's responses.",
        "reward": "Reward-model score of the policy's responses (this iteration's reward model, normalized).",
        "kl": "KL of the policy to the SFT model, nats per response.",
        "entropy": "Per-token entropy of the policy.",
        "response_length": "Response tokens, mean.",
        "eos_rate": "Share of responses that end with EOS.",
        "distinct_1": "Distinct unigrams over all unigrams of the policy's responses.",
        "distinct_2": "Distinct bigrams over all bigrams of the policy's responses.",
        "sft_distinct_2": "The same for the SFT model's responses.",
        "gold/{attribute}": "One attribute of the gold reward (on_topic, polite, length, ...), mean over the "
        "policy's responses, where the judge has attributes (the toy world's); the attributes sum to gold_reward.",
        "sft_gold/{attribute}": "The same for the SFT model's responses.",
    },
)

HUMAN_EVALUATION = Phase(
    "human_eval",
    "iteration-{iteration}/human-evaluation",
    {
        "pairs": "Blind (policy, SFT) pairs given to people (evaluation.human_pairs).",
        "win_rate_vs_sft": "Share of people's judgments preferring the policy's response to the SFT model's, ties "
        "counting one half: InstructGPT's headline metric, and what a team without a gold judge relies on.",
        "labels": "Human judgments received.",
        "tie_rate": "Share of them that call the pair a tie.",
    },
)

# The pipeline run's own metrics, one step per iteration: the evaluation's headline numbers beside the
# reward model's and the labelers', what the summary table and plots/iterations.png show.
ITERATION = Phase(
    "iteration",
    "pipeline-{flow_run_name}",
    {
        "win_rate_vs_sft": EVALUATION.metrics["win_rate_vs_sft"],
        "win_rate_stderr": EVALUATION.metrics["win_rate_stderr"],
        "gold_reward": EVALUATION.metrics["gold_reward"],
        "sft_gold_reward": EVALUATION.metrics["sft_gold_reward"],
        "gold/{attribute}": EVALUATION.metrics["gold/{attribute}"],
        "sft_gold/{attribute}": EVALUATION.metrics["sft_gold/{attribute}"],
        "reward": EVALUATION.metrics["reward"],
        "kl": EVALUATION.metrics["kl"],
        "entropy": EVALUATION.metrics["entropy"],
        "response_length": EVALUATION.metrics["response_length"],
        "rm_val_accuracy": REWARD.metrics["val_accuracy"],
        "labeler_agreement": PREFERENCES.metrics["labeler_agreement"],
        "human_win_rate_vs_sft": HUMAN_EVALUATION.metrics["win_rate_vs_sft"] + " (with evaluation.human_pairs)",
    },
)
EVALUATION_SUMMARY = (
    "win_rate_vs_sft",
    "win_rate_stderr",
    "gold_reward",
    "sft_gold_reward",
    "reward",
    "kl",
    "entropy",
    "response_length",
)
# MLflow's system metrics (system/cpu_utilization_percentage, system/system_memory_usage_megabytes, system/gpu_...)
# go to every phase run at tracking.system_metrics_interval; MLflow names them, not this catalog.

PHASES = {
    phase.namespace: phase
    for phase in (DATA, SFT, PREFERENCES, REWARD, PPO, DPO, EVALUATION, HUMAN_EVALUATION, ITERATION)
}


def pipeline_run_name(flow_run_name: str | None) -> str:
    return ITERATION.run_name.format(flow_run_name=flow_run_name or "local")


# Params: the pipeline run gets the whole config, flattened (``ppo.kl_coef``; secret-looking keys dropped), and each
# phase run its own section of it and ``seed``.

TAG_FLOW_RUN = "prefect_flow_run_id"
TAG_FLOW_RUN_URL = "prefect_flow_run_url"
TAG_LINEAGE = "lineage"
TAG_RESUMED_FROM = "rlhf.resumed_from_step"
TAG_ALARM = "rlhf.alarm.{name}"  # on a PPO phase run: what a training-health alarm saw (rlhf_core/alarms.py)
TAG_CODE_VERSION = "rlhf.code_version"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_REGISTERED_MODEL = "rlhf.registered_model"
TAG_CHAMPION = "rlhf.champion"
TAG_ARTIFACTS_URI = "rlhf.artifacts_uri"
TAG_POLICY_URI = "rlhf.final_policy_uri"
TAGS = {
    TAG_FLOW_RUN: "The Prefect flow run this pipeline run is (pipeline run).",
    TAG_FLOW_RUN_URL: "That flow run's page in the Prefect UI, where the UI's address is known (pipeline run).",
    TAG_CODE_VERSION: "Digest of the phases' source code, the one their cache keys use (pipeline and phase runs).",
    TAG_GIT_COMMIT: "The git commit of the source, where it runs from a git checkout (pipeline run).",
    TAG_REGISTERED_MODEL: "The final policy's registered version: name, version, alias, as JSON (pipeline run).",
    TAG_CHAMPION: "The champion version after the run: name, version, iteration, metric, value, as JSON (pipeline "
    "run).",
    TAG_ARTIFACTS_URI: "Where the run's artifacts are in the object store (pipeline run).",
    TAG_POLICY_URI: "The final policy's folder in the object store (pipeline run).",
    TAG_LINEAGE: "The lineage the run continues, empty for a standalone run (pipeline run).",
    TAG_RESUMED_FROM: "The checkpoint step a phase resumed from after a crash (phase run).",
}

SAMPLES_ARTIFACT = "samples/iteration_{iteration:03d}.json"
PLOT_ARTIFACT = "plots/iterations.png"
PIPELINE_ARTIFACT = "pipeline.json"
CONFIG_ARTIFACT = "config.yaml"
REPORT_ARTIFACT = "report.html"
ARTIFACTS = {
    CONFIG_ARTIFACT: "The run's whole config, secrets left out (pipeline run).",
    REPORT_ARTIFACT: "The report: the iterations' table and plots, sample completions, links (pipeline run; also "
    "the run's description).",
    SAMPLES_ARTIFACT: "Sample completions, policy beside SFT, with their gold rewards (a table; pipeline run).",
    PLOT_ARTIFACT: "The iteration metrics against iteration, SFT as iteration 0 (pipeline run).",
    PIPELINE_ARTIFACT: "Each phase's state (Completed, Cached, Reused) and the final policy's artifact (pipeline run).",
}
