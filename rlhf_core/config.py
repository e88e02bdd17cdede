"""Every phase's settings: one pydantic model per phase, a description on every field, importable without torch (the
CLI reads and checks a config, and finds a run already done, before it loads any model)."""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rlhf_core.alarms import AlarmConfig
from rlhf_core.labelers import LabelerConfig, default_labelers


class LoRAConfig(BaseModel):
    """Low-rank adapters on a model (the policy, the reward model or the critic)."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, description="Rank of each adapter.")
    alpha: float = Field(16.0, gt=0, description="Scale of the adapters' output (alpha / r multiplies it).")
    target_modules: str | list[str] = Field(
        "all-linear", description="Layers that get adapters: 'all-linear' or a list of module names."
    )


Autocast = Literal["off", "bf16", "fp16"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]
RewardPooling = Literal["last", "sum"]


class ComputeConfig(BaseModel):
    """How the models run on the hardware: mixed precision, activation recomputation and the attention kernel."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    autocast: Autocast = Field(
        "off",
        description="Mixed precision under plain torch: every model's matmuls run in bf16 or fp16 under "
        "torch.autocast, in every phase (the trained models, PPO's and DPO's frozen reference and reward model, "
        "sampling and evaluation), while weights and AdamW state stay fp32 and log-probs are taken in fp32; fp16 adds "
        "dynamic loss scaling. bf16 needs a GPU that has it (Ampere or later) or the CPU (slow). off: fp32 "
        "throughout. Under DeepSpeed use deepspeed.precision instead.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in the backward pass instead of holding them, for the "
        "trained models (the policy in SFT, PPO and DPO, the reward model, the critic), under plain torch and "
        "DeepSpeed, with LoRA too: less memory for about a third more compute, the same results. Sampling still "
        "uses the KV cache.",
    )
    attn_implementation: AttnImplementation = Field(
        "sdpa",
        description="The attention kernel every model loads with: sdpa (torch's scaled_dot_product_attention), "
        "eager (plain matmuls), or flash_attention_2 (needs the flash-attn package, a GPU and compute.autocast bf16 "
        "or fp16, so not with deepspeed yet). A kernel changes rounding, not results, so it is not part of the "
        "phases' cache keys.",
    )

    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads each phase's torch runs on (each rank's, under DeepSpeed); null: torch's default "
        "(one per core) in-process, one per rank. On a CPU shared with other work, fewer threads than cores can be "
        "several times faster: threads that wait on one another stall when the scheduler runs others. Changes "
        "rounding, not results, so it is not part of the phases' cache keys.",
    )

    @field_validator("attn_implementation")
    @classmethod
    def _flash_attn_installed(cls, value: str) -> str:
        if value == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError(
                "flash_attention_2 needs the flash-attn package, which is not installed here (pip install flash-attn "
                "on a machine with a CUDA GPU); use sdpa"
            )
        return value

    def cache_identity(self) -> dict[str, str]:
        """What of this config changes a phase's artifact: the precision. Recomputing activations and the attention
        kernel change neither the math nor, beyond rounding, the numbers."""
        return {"autocast": self.autocast}


DEFAULT_COMPUTE = ComputeConfig()  # fp32, no recomputation, sdpa: the default of every phase that takes one


class SFTConfig(BaseModel):
    """Supervised fine-tuning on (prompt, response) demonstrations."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(2, ge=1, description="Passes over the demonstrations.")
    batch_size: int = Field(64, ge=1, description="Demonstrations per optimizer step.")
    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate (linear warmup, cosine decay).")
    warmup_steps: int = Field(20, ge=0, description="Optimizer steps of linear learning-rate warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clipping threshold.")
    max_length: int = Field(48, ge=4, description="Prompt + response tokens kept; longer responses are truncated.")
    log_every: int = Field(10, ge=1, description="Report metrics every this many optimizer steps.")
    packing: bool = Field(
        True,
        description="Pack each batch's demonstrations several to a row of max_length tokens, each attending only to "
        "itself with its positions restarting, so that compute goes to tokens rather than padding: the loss and "
        "gradients of padded rows. Where the model does not keep packed sequences apart (checked on two short ones "
        "before training), rows are padded.",
    )
    checkpoint_every: int = Field(
        100, ge=0, description="Save a resumable checkpoint every this many optimizer steps; 0: never."
    )


class LabelStudioConfig(BaseModel):
    """A Label Studio server that people label the batches in."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(
        description="Label Studio's address, e.g. http://127.0.0.1:8080; its API token comes from "
        "the environment variable LABEL_STUDIO_API_KEY."
    )
    project_title: str = Field("rlhf", description="The project to create, or reuse, for the labeling batches.")
    poll_interval_s: float = Field(15.0, gt=0, description="Seconds between checks for finished annotations.")


class PreferenceConfig(BaseModel):
    """Sampling response pairs from the current policy and labeling them."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["simulated", "human"] = Field(
        "simulated",
        description="Who labels the pairs: the simulated labelers, or people (each iteration publishes a labeling "
        "batch and waits for labels from `rlhf label import`, the Prefect UI or Label Studio).",
    )
    n_pairs: int = Field(1536, ge=1, description="Response pairs sampled per iteration (identical pairs are dropped).")
    max_new_tokens: int = Field(32, ge=1, description="Longest sampled response, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for the response pairs.")
    batch_size: int = Field(256, ge=1, description="Prompts per generation batch.")
    labelers: list[LabelerConfig] = Field(
        default_factory=default_labelers,
        min_length=2,
        description="The simulated labelers; each pair is labeled by all of them.",
    )
    target_agreement: float | None = Field(
        0.7,
        gt=0.5,
        lt=1.0,
        description="Scale labeler noise so two labelers agree on this fraction of the pairs the gold judge decides "
        "(InstructGPT saw about 0.7); null keeps noise_scale fixed.",
    )
    noise_scale: float = Field(1.0, gt=0, description="Shared labeler noise when target_agreement is null.")
    gold_ties: Literal["label", "drop"] = Field(
        "label",
        description="Simulated labels of pairs the gold judge scores alike (a judge of discrete scores, such as the "
        "share of an instruction's constraints met, ties often): label them (each labeler's pick is then a coin flip, "
        "or its taste for length) or drop them (counted as dropped_gold_ties). Either way the labelers' noise is "
        "calibrated to target_agreement on the pairs the judge decides, as labelers agree on a tie half the time "
        "at any noise.",
    )
    min_labeled_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Human labels: the share of a batch's pairs that must have a label before the iteration goes "
        "on; pairs left unlabeled are dropped and counted.",
    )
    labels_per_pair: int = Field(
        1,
        ge=1,
        description="Human labels: labels wanted per pair (overlap between labelers); Label Studio's wait "
        "ends when that many labelers have labeled each pair.",
    )
    label_timeout_s: float = Field(
        86400.0,
        gt=0,
        description="Human labels: how long a run waits for them before it fails (the batch and any labels are "
        "kept: re-run the same command to wait again).",
    )
    label_studio: LabelStudioConfig | None = Field(
        None, description="Human labels: also publish each batch to this Label Studio server and wait for it."
    )

    def cache_identity(self) -> dict[str, Any]:
        """What of this config decides the phase's output: the labelers' settings for simulated labels, the
        labeling settings for human ones (how long to wait decides nothing)."""
        human_only = {"min_labeled_fraction", "labels_per_pair", "label_timeout_s", "label_studio", "source"}
        simulated_only = {"labelers", "target_agreement", "noise_scale", "gold_ties"}
        exclude = human_only if self.source == "simulated" else simulated_only | {"label_timeout_s"}
        return self.model_dump(mode="json", exclude=exclude)


class RewardConfig(BaseModel):
    """Bradley-Terry reward-model training."""

    model_config = ConfigDict(extra="forbid")
    warm_start: bool = Field(
        True,
        description="Start each iteration's reward model from the previous iteration's (still trained on every "
        "preference so far) rather than from the base backbone, so it accumulates training across iterations; "
        "the first iteration starts from the base.",
    )
    max_epochs: int = Field(2, ge=1, description="Most passes over the training pairs (early stopping may end sooner).")
    epoch_size: Literal["all", "latest"] = Field(
        "all",
        description="What one pass covers: every training pair so far (all), or as many pairs as the latest iteration "
        "added, drawn afresh from all of them (latest). With warm_start, latest trains each iteration's reward model "
        "for the same number of steps however many iterations came before, rather than for ever more.",
    )
    batch_size: int = Field(32, ge=1, description="Preference pairs per optimizer step.")
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(10, ge=0, description="Optimizer steps of linear learning-rate warmup.")
    weight_decay: float = Field(
        0.01, ge=0, description="AdamW weight decay (a slightly underfit reward model is safer)."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clipping threshold.")
    val_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Share of comparisons held out for validation accuracy and early stopping: the same ones in every "
        "iteration (by a digest of the prompt and its two responses), all labels of one comparison on one side.",
    )
    evals_per_epoch: int = Field(2, ge=1, description="Validation checks per epoch.")
    patience: int = Field(2, ge=1, description="Validation checks without improvement before stopping early.")
    max_length: int = Field(48, ge=4, description="Prompt + response tokens kept.")
    pooling: RewardPooling = Field(
        "sum",
        description="How the scalar head's per-token scores become a response's reward: its score at the response's "
        "last token, the EOS, which attends to the whole sequence (last; InstructGPT's reward model); or the sum of "
        "its scores over the response's tokens, EOS included (sum: a reward that adds up word by word, where the "
        "head only has to judge each token in its context). Stored with the model, so every phase reads it alike.",
    )
    logprob_coef: float = Field(
        0.15,
        ge=0,
        description="Add to each token's score this multiple of the log-probability that the reward model's own "
        "backbone gives the token, read through its input embeddings as the output layer (the language-model head "
        "of a model whose embeddings are tied, as the toy world's are): a match between a token and its context, "
        "such as a word and the prompt's topic, that a scalar head on one position cannot compute. 0: the scalar "
        "head alone. Larger values let PPO chase the backbone's likelihood (0.3 doubled the first iteration's KL on "
        "one seed of five). Stored with the model, so every phase reads it alike.",
    )
    packing: bool = Field(
        True,
        description="Pack each batch's responses (chosen and rejected) several to a row of max_length tokens, each "
        "attending only to itself with its positions restarting, and read each reward at its own last token: the "
        "loss and gradients of padded rows in less compute. Where the model does not keep packed sequences apart "
        "(checked on two short ones before training), rows are padded.",
    )
    checkpoint_every: int = Field(
        50, ge=0, description="Save a resumable checkpoint every this many optimizer steps; 0: never."
    )
    ensemble_size: int = Field(
        1,
        ge=1,
        le=16,
        description="Reward models trained in the phase, each with its own seed (and its own resample of the pairs "
        "with reward.bootstrap); PPO and evaluation score with their aggregate (reward.aggregate). The critic starts "
        "from the first.",
    )
    bootstrap: bool = Field(False, description="Train each ensemble member on a bootstrap resample of the pairs.")
    lora: LoRAConfig | None = Field(
        None,
        description="Train each reward model as LoRA adapters on its initial model, its scalar head in full; "
        "saved with the adapters merged in, as a plain sequence-classification model.",
    )
    aggregate: Literal["mean", "min", "mean_minus_std"] = Field(
        "mean",
        description="How an ensemble's scores become one reward: mean, min (worst case) or mean_minus_std (the mean "
        "less reward.uncertainty_coef times the members' standard deviation), as in Coste et al. 2023.",
    )
    uncertainty_coef: float = Field(
        1.0, ge=0, description="Weight of the members' standard deviation (mean_minus_std)."
    )
    strength_margins: list[float] | None = Field(
        None,
        min_length=4,
        max_length=4,
        description="Margins in the Bradley-Terry loss for a human label's strength 1-4 (negligibly, slightly, "
        "better, significantly better), as Llama 2 does, e.g. [0, 0.33, 0.67, 1]; labels without one get 0. "
        "Null: no margins.",
    )


class PPOConfig(BaseModel):
    """PPO against the reward model with a KL penalty to the SFT reference."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(28, ge=1, description="Rollout-then-update steps.")
    rollout_batch_size: int = Field(64, ge=1, description="Prompts sampled per step.")
    minibatch_size: int = Field(16, ge=1, description="Rollouts per optimizer step inside an update.")
    epochs: int = Field(2, ge=1, description="Passes over each rollout batch.")
    lr: float = Field(3e-4, gt=0, description="Policy AdamW learning rate.")
    critic_lr: float = Field(1e-3, gt=0, description="Critic AdamW learning rate.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clipping for policy and critic.")
    max_new_tokens: int = Field(32, ge=1, description="Longest sampled response, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; log-probs are recomputed with it.")
    missing_eos_penalty: float = Field(1.0, ge=0, description="Subtracted from the score of a response with no EOS.")
    dense_rewards: bool = Field(
        True,
        description="With a summed reward model (reward.pooling: sum) reading the policy's tokens, reward each "
        "response token with the share of the score it earned, rather than the whole score at the last token: the "
        "same total, and advantages that no longer carry the rewards of earlier tokens (lower variance). Ignored "
        "for a last-token reward model.",
    )
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clip epsilon.")
    clip_range_value: float = Field(0.2, gt=0, description="Value-prediction clip around the rollout's values.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten_advantages: bool = Field(True, description="Normalize advantages to mean 0, std 1 per batch.")
    kl_coef: float = Field(0.15, ge=0, description="Initial coefficient of the per-token KL penalty.")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="Per-token KL estimator in the penalty.")
    adaptive_kl: bool = Field(True, description="Adapt kl_coef toward kl_target (Ziegler et al. 2019); else fixed.")
    kl_target: float = Field(3.0, gt=0, description="Target KL to the reference, in nats per response.")
    kl_horizon: int = Field(
        500,
        ge=1,
        description="Horizon of the adaptive KL controller, in samples. Keep it to a fraction of a phase's "
        "steps * rollout_batch_size, or the coefficient barely moves.",
    )
    max_kl: float | None = Field(
        50.0, gt=0, description="Stop PPO with an error once the KL to the reference passes this (nats per response)."
    )
    lora: LoRAConfig | None = Field(
        None, description="Train the policy as LoRA adapters, the reference being the same model with them off."
    )
    critic_lora: LoRAConfig | None = Field(
        None, description="Train the critic as LoRA adapters on its initial model, its value head in full."
    )
    checkpoint_every: int = Field(10, ge=0, description="Save a resumable checkpoint every this many steps; 0: never.")
    target_kl: float | None = Field(
        0.1, gt=0, description="Stop an update early once the minibatch approx-KL to the rollout policy exceeds this."
    )
    alarms: AlarmConfig = Field(
        default_factory=AlarmConfig, description="Thresholds of the training-health alarms (length hacking, ...)."
    )
    stop_on_alarm: bool = Field(False, description="Stop the phase with an error at its first training-health alarm.")
    parallel_critic: bool = Field(
        True,
        description="On a CPU, in one process: run the critic's forward, backward and optimizer step in a thread "
        "beside the policy's, and its forward over each rollout beside the reference's, each on half the CPU threads. "
        "The same updates, up to rounding, in less time: tiny models leave a core idle. Ignored on a GPU and under "
        "DeepSpeed.",
    )
    group_by_length: bool = Field(
        True,
        description="Form each epoch's minibatches from rollouts of similar length, in random order, so that they "
        "carry little padding to train on; else uniformly random minibatches.",
    )
    packing: bool = Field(
        True,
        description="Pack rollouts (prompt and response) several to a row for the forwards of the reference and the "
        "critic scoring them and of the policy and the critic training on each minibatch, each attending only to "
        "itself with its positions restarting: the log-probs and values of padded rows without computing padding. "
        "Where a model does not keep packed sequences apart (checked on two short ones before training), rows are "
        "padded.",
    )

    def cache_identity(self) -> dict[str, Any]:
        """What of this config decides the phase's output: all of it but ``parallel_critic``, which changes how the
        same updates are scheduled on a CPU's threads (and so the rounding), not the updates."""
        return self.model_dump(mode="json", exclude={"parallel_critic"})


class DPOConfig(BaseModel):
    """DPO as each iteration's policy phase (``algorithm: dpo``)."""

    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.1, gt=0, description="Strength of the KL regularization to the reference (DPO's beta).")
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid",
        description="sigmoid: the DPO loss; ipo: IPO's squared loss (Azar et al. 2023) on per-token (length-"
        "normalized) log-ratios.",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Conservative DPO (cDPO): the assumed probability that a label is flipped."
    )
    reference: Literal["sft", "previous"] = Field(
        "sft",
        description="The frozen reference: the SFT model, or the previous iteration's policy (iterative DPO "
        "recipes differ on this).",
    )
    pairs: Literal["all", "latest"] = Field(
        "all", description="Train on the preference pairs of every iteration so far, or on the latest iteration's."
    )
    online: bool = Field(
        True,
        description="Iterative (online) DPO: each iteration's pairs are sampled from the current policy and labeled "
        "(Dong et al. 2024); false: always sampled from the SFT model (offline DPO, on the SFT distribution).",
    )
    epochs: int = Field(2, ge=1, description="Passes over the training pairs.")
    batch_size: int = Field(32, ge=1, description="Preference pairs per optimizer step.")
    lr: float = Field(1e-4, gt=0, description="Peak AdamW learning rate (linear warmup, cosine decay).")
    warmup_steps: int = Field(5, ge=0, description="Optimizer steps of linear learning-rate warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clipping threshold.")
    max_length: int = Field(48, ge=4, description="Prompt + response tokens kept; longer responses are truncated.")
    log_every: int = Field(5, ge=1, description="Report metrics every this many optimizer steps.")
    checkpoint_every: int = Field(
        50, ge=0, description="Save a resumable checkpoint every this many optimizer steps; 0: never."
    )
    lora: LoRAConfig | None = Field(
        None, description="Train the policy as LoRA adapters, the SFT reference being the same model with them off."
    )


class EvalConfig(BaseModel):
    """Held-out evaluation."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(32, ge=1, description="Longest sampled response, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for policy and SFT samples.")
    batch_size: int = Field(256, ge=1, description="Prompts per generation batch.")
    n_samples_logged: int = Field(32, ge=0, description="Sample completions logged to MLflow as a table.")
    samples_per_prompt: int = Field(
        1,
        ge=1,
        description="Responses per held-out prompt from the policy and from the SFT baseline; the win rate is over "
        "matched pairs (the policy's j-th response against the baseline's j-th), its standard error over prompts.",
    )
    human_pairs: int = Field(
        0,
        ge=0,
        description="Also have people judge this many (policy, SFT) response pairs blind, A and B in random order, "
        "through the labeling path of preferences.source: human (its timeout, min_labeled_fraction and Label "
        "Studio settings); reports the human-judged win rate beside the gold one. 0: none.",
    )
