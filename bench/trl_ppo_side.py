"""The TRL half of ``python -m bench.ppo_vs_trl``: TRL 1.12's PPOTrainer on saved models, timed per PPO step.

Run it with the TRL venv's python (``bench.trl_venv.trl_python()``); it imports nothing from the project::

    python bench/trl_ppo_side.py --policy P --reward R --critic C --prompts prompts.json --steps 3 --out trl.json

Configuration: 64 rollouts a step in 4 minibatches of 16 (TRL counts the rollout batch as
``per_device_train_batch_size * gradient_accumulation_steps``, so that is 64 x 1 with ``num_mini_batches=4``; a
per-device batch of 16 would mean 16 rollouts a step), 4 PPO epochs, 32 new tokens, temperature 1, stop at EOS,
missing-EOS penalty 1, fixed k1 KL coefficient 0.15, clip 0.2/0.2, vf_coef 0.5, gamma 1, lambda 0.95, AdamW at a
constant 3e-4 (TRL's default would decay it linearly to 0), fp32, no eval, no sample tables, no checkpoints.

Timing: ``on_step_end``, which ``PPOTrainer.train`` calls once per PPO step, after logging and ``lr_scheduler.step()``;
step 1 runs from ``on_train_begin``. The rest of an iteration (``gc.collect()``, deletes) runs after the callback, so it
is counted in the next step; the last step's tail is reported in the notes. Response lengths come from TRL's own
``get_reward`` call on the reward model (wrapped to observe, not changed); TRL logs neither length nor width.

How TRL 1.12's PPO (trl/experimental/ppo/ppo_trainer.py, PPOTrainer.train unless named) differs from a textbook
PPO-with-KL-penalty loop:

- One optimizer for policy and critic: ``PolicyAndValueWrapper`` holds both and ``__init__`` builds a single
  ``Trainer.create_optimizer_and_scheduler`` optimizer over it (AdamW, ``optim="adamw_torch_fused"`` by default in
  transformers 5.24, weight decay 0, eps 1e-8): one learning rate for the critic and the policy, one backward of
  ``pg_loss + vf_coef * vf_loss``; the critic is a separate network (its own backbone + ``score`` head).
- No gradient clipping: ``accelerator.backward(loss); optimizer.step()`` with no ``clip_grad_norm_``;
  ``max_grad_norm`` is ignored. ``gradient_checkpointing`` (TRL default True) is also never applied, since
  ``PPOTrainer.__init__`` does not call ``Trainer.__init__``.
- The learning-rate scheduler is stepped once per PPO step; ``lr_scheduler_type`` defaults to linear decay to 0 over
  ``total_episodes / batch_size`` steps (set to constant here).
- The value loss is ``0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2))`` and then weighted by ``vf_coef``: the
  effective weight on the squared error is ``0.5 * vf_coef`` (0.25 here). Values are clipped around the rollout's.
- Policy loss: clipped surrogate, masked mean over all response tokens of the minibatch (token-weighted, long
  responses weigh more); no entropy bonus.
- Rollout log-probs are taken from ``generate``'s ``output_scores`` (``generate``/``batch_generation``: KV-cached
  decoding, logits after the temperature warper, ``top_k=0``, ``top_p=1``, temperature + 1e-7), while training
  log-probs come from a full forward with explicit position ids (``forward``): equal only up to float error (fp32,
  toy model: step 1's ``objective/kl`` between identical policy and reference was 0 with 2 threads, 1e-7 with 1).
- Reference log-probs: a separate forward of ``ref_model`` (here a second copy of --policy; without one TRL deep-copies
  the policy via experimental/utils.py:create_reference_model) on the untruncated query+response, logits divided by
  temperature + 1e-7, same position-id scheme (``forward``).
- Generation stops when every sequence of the batch has emitted EOS (``stop_token="eos"`` also overwrites the policy's
  ``generation_config.eos_token_id`` in ``__init__``), so the padded response width can be below ``response_length``.
  All 64 prompts are generated in one ``generate`` call (``local_rollout_forward_batch_size=64``).
- Truncation: ``truncate_response`` keeps the first EOS and fills everything after it with pad. The response ends at
  its first pad token, so a pad token sampled mid-response also ends it (attention masks are ``tokens != pad``).
- Reward: experimental/utils.py:get_reward runs the reward model's backbone + ``score`` on query + truncated
  response and reads the score at the last non-pad token (the EOS, or the last token when there is none). Raw score:
  no normalization, no clipping, no whitening (``whiten_rewards=False``). Responses without EOS get
  ``score -= missing_eos_penalty`` and are still trained on.
- Where the score lands: ``rewards[i, sequence_length + 1] += score``, i.e. on the first pad position after the EOS
  (on the last token only when the response fills the width). That position is inside the value mask
  (``padding_mask_p1``) but outside the policy mask, so the critic learns a value for the post-EOS state and the EOS
  token's advantage reaches the score through GAE: with lambda < 1 the score is effectively discounted once more for
  responses that stop early than for those cut at the length limit.
- KL: per-token ``-kl_coef * (logp - ref_logp)`` (k1) added to the rewards, not to the loss; fixed coefficient (no
  adaptive controller in 1.12); the EOS token carries KL too; padded positions hold ``INVALID_LOGPROB`` in both terms.
- Advantages: GAE over the whole padded width, then whitened once over the whole rollout batch (``masked_whiten``,
  Bessel-corrected variance, mean shifted), not per minibatch; returns are the unwhitened advantages + values.
- Minibatches: ``num_ppo_epochs * num_mini_batches`` optimizer steps per rollout, a fresh ``np.random.permutation``
  each epoch from numpy's global RNG, which TRL never seeds (this script calls ``transformers.set_seed``). TRL reseeds
  torch around ``accelerator.prepare`` in ``__init__``.
- Data: ``DataLoader(shuffle=True, drop_last=True)`` cycled forever (``repeat_generator``): one sample per prompt,
  64 distinct prompts a step; fewer prompts than the rollout batch would loop forever (this script refuses).
- Dropout: trainer/utils.py:disable_dropout_in_model sets ``p=0`` on every ``nn.Dropout`` of policy, ref, critic and
  reward model (functional dropout such as a config's ``attention_dropout`` is not touched); policy and critic stay
  in ``train()`` mode throughout, rollouts included.
- Housekeeping inside the timed loop: ``gc.collect()`` twice per step (after the rollout and after ``on_step_end``)
  and several ``empty_cache()`` calls (experimental/utils.py:empty_cache; no-ops on CPU).
- Metrics (``metrics`` below): ``objective/kl`` is the summed k1 estimate on the rollout, before the update;
  ``objective/entropy`` is the summed negative log-prob of the sampled tokens, not the distribution's entropy;
  ``policy/entropy_avg`` averages the true entropy over all positions, padding included; ``val/num_eos_tokens``
  counts every EOS in the untruncated responses (several per response possible).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for _var in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "HF_DATASETS_OFFLINE", "TRL_EXPERIMENTAL_SILENCE"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PrinterCallback,
    TrainerCallback,
    set_seed,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402
from trl.experimental.ppo import ppo_trainer as trl_ppo  # noqa: E402
from trl.experimental.utils import first_true_indices  # noqa: E402

ROLLOUTS, MINIBATCHES = 64, 4


class StepRecorder(TrainerCallback):
    """Wall seconds per PPO step (between ``on_step_end`` calls) and the rollout's response lengths."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.seconds: list[float] = []
        self.mean_length: list[float | None] = []
        self.width: list[int | None] = []
        self.tail_seconds = 0.0
        self._lengths: list[torch.Tensor] = []
        self._width: int | None = None
        self._last = 0.0

    def observe(self, query_responses: torch.Tensor, pad_token_id: int, context_length: int) -> None:
        """Called with what TRL scores: query + truncated response; the response ends at its first pad."""
        responses = query_responses[:, context_length:]
        self._lengths.append(first_true_indices(responses == pad_token_id).float())
        self._width = responses.shape[1]

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        self.seconds.append(now - self._last)
        self._last = now
        self.mean_length.append(torch.cat(self._lengths).mean().item() if self._lengths else None)
        self.width.append(self._width)
        self._lengths, self._width = [], None
        step = len(self.seconds)
        print(f"trl step {step}/{self.total}: {self.seconds[-1]:.2f} s", file=sys.stderr, flush=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.tail_seconds = time.perf_counter() - self._last


def observe_reward_calls(reward_model: torch.nn.Module, recorder: StepRecorder) -> None:
    """Wrap TRL's ``get_reward`` (as the PPO module sees it) to report each reward-model call to ``recorder``."""
    original = trl_ppo.get_reward

    def get_reward(
        model: torch.nn.Module, query_responses: torch.Tensor, pad_token_id: int, context_length: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if model is reward_model:
            recorder.observe(query_responses, pad_token_id, context_length)
        return original(model, query_responses, pad_token_id, context_length)

    trl_ppo.get_reward = get_reward


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", type=Path, required=True, help="saved causal LM + tokenizer folder")
    parser.add_argument("--reward", type=Path, required=True, help="saved sequence classifier (num_labels=1)")
    parser.add_argument("--critic", type=Path, required=True, help="value model's initial weights (as --reward)")
    parser.add_argument("--prompts", type=Path, required=True, help="JSON list of prompt strings")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    set_seed(args.seed)  # python, numpy (TRL's minibatch permutations) and torch
    prompts = json.loads(args.prompts.read_text())
    if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
        sys.exit(f"{args.prompts}: expected a JSON list of strings")
    if len(prompts) < ROLLOUTS:
        sys.exit(f"{args.prompts}: {len(prompts)} prompts, need at least {ROLLOUTS} (TRL drops incomplete batches)")

    tokenizer = AutoTokenizer.from_pretrained(args.policy, padding_side="left")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        sys.exit(f"{args.policy}: the tokenizer needs a pad and an eos token")
    fp32: dict[str, Any] = {"dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(args.policy, **fp32)
    ref_policy = AutoModelForCausalLM.from_pretrained(args.policy, **fp32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, **fp32)
    value_model = AutoModelForSequenceClassification.from_pretrained(args.critic, num_labels=1, **fp32)
    dataset = Dataset.from_dict({"prompt": prompts}).map(
        lambda batch: {"input_ids": tokenizer(batch["prompt"], padding=False)["input_ids"]},
        batched=True,
        remove_columns=["prompt"],
    )

    with tempfile.TemporaryDirectory(prefix="trl-ppo-") as output_dir:
        config = PPOConfig(
            output_dir=output_dir,
            use_cpu=True,
            seed=args.seed,
            per_device_train_batch_size=ROLLOUTS,
            gradient_accumulation_steps=1,
            num_mini_batches=MINIBATCHES,
            num_ppo_epochs=4,
            total_episodes=ROLLOUTS * args.steps,
            response_length=32,
            temperature=1.0,
            stop_token="eos",
            missing_eos_penalty=1.0,
            kl_coef=0.15,
            kl_estimator="k1",
            cliprange=0.2,
            cliprange_value=0.2,
            vf_coef=0.5,
            gamma=1.0,
            lam=0.95,
            learning_rate=3e-4,
            lr_scheduler_type="constant",
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            report_to=[],
            num_sample_generations=0,
            eval_strategy="no",
            save_strategy="no",
            disable_tqdm=True,
        )
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref_policy,
            reward_model=reward_model,
            value_model=value_model,
            train_dataset=dataset,
        )
        if (config.batch_size, config.mini_batch_size) != (ROLLOUTS, ROLLOUTS // MINIBATCHES):
            sys.exit(f"TRL computed batch {config.batch_size}, minibatch {config.mini_batch_size}: one process only")
        trainer.remove_callback(PrinterCallback)  # it would print every step's metrics to stdout
        recorder = StepRecorder(args.steps)
        trainer.add_callback(recorder)
        observe_reward_calls(trainer.reward_model, recorder)
        with contextlib.redirect_stdout(sys.stderr):  # TRL's own prints; stdout keeps only the summary line
            trainer.train()

    result = {
        "trl_version": trl.__version__,
        "seconds_per_step": recorder.seconds,
        "samples_per_step": config.batch_size,
        "response_length": recorder.mean_length,
        "padded_response_width": recorder.width,
        "metrics": [entry for entry in trainer.state.log_history if "episode" in entry],
        "notes": [
            "seconds: time.perf_counter() between TrainerCallback.on_step_end calls (step 1 from on_train_begin); "
            "each step's window includes the previous step's tail (gc.collect(), deletes) after on_step_end",
            f"tail after the last on_step_end, not in seconds_per_step: {recorder.tail_seconds:.3f} s",
            "response_length: mean tokens up to and including the first EOS (TRL's sequence_lengths + 1), from the "
            "truncated responses TRL passes to get_reward; padded_response_width: the rollout tensor's width, below "
            "response_length when every sequence stopped early; TRL logs neither",
            f"rollout batch {config.batch_size} = per_device_train_batch_size {config.per_device_train_batch_size} x "
            f"gradient_accumulation_steps 1; {MINIBATCHES} minibatches of {config.mini_batch_size}, "
            f"{config.num_ppo_epochs} epochs: {config.num_ppo_epochs * MINIBATCHES} optimizer steps a PPO step",
            f"optimizer {getattr(config.optim, 'value', config.optim)} over policy + critic, constant lr "
            f"{config.learning_rate} "
            "(lr_scheduler_type=constant; TRL's default is linear decay), no gradient clipping (TRL has none)",
            f"torch {torch.__version__}, {args.threads} threads, fp32, seed {args.seed}",
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    later = recorder.seconds[1:] or recorder.seconds
    lengths = [x for x in recorder.mean_length if x is not None]
    mean_length = sum(lengths) / len(lengths) if lengths else float("nan")
    print(
        f"trl {trl.__version__} PPO: {len(recorder.seconds)} steps, {sum(later) / len(later):.2f} s/step "
        f"(steps 2+), {config.batch_size} samples/step, mean response {mean_length:.1f} tokens -> {args.out}"
    )


if __name__ == "__main__":
    main()
