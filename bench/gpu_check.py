"""GPU check: one SFT, one reward-model and one PPO step on a ~0.5B-parameter Llama built from a config (random
weights: nothing to download), each under DeepSpeed ZeRO-2 with bf16 on one GPU; prints tokens/s, peak GPU memory
and MFU per phase. Each phase runs a warm-up step first; the figures are of the step after it.

    python -m bench.gpu_check                                   # one NVIDIA GPU, offline, a few minutes
    python -m bench.gpu_check --tiny --device cpu --precision fp32   # a smoke run anywhere

Model FLOPs: training 6 x parameters per token (forward and backward). A PPO step counts generation
(2 x parameters per generated token), the four scoring forwards over the rollout (policy, reference, critic,
reward model: 2 x parameters per token each) and the policy and critic updates (6 x parameters per token each,
per epoch). MFU divides by ``--peak-tflops`` (default 989: H100/H200 SXM dense bf16).
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForSequenceClassification

from infra.deepspeed_engine import DeepSpeedConfig, DeepSpeedEngine
from rlhf_core import world
from rlhf_core.engine import Optimization
from rlhf_core.losses import bradley_terry_loss
from rlhf_core.modeling import disable_dropout, encode_prompt_responses
from rlhf_core.ppo import PPOConfig, PPOModels, train_ppo
from rlhf_core.preferences import PreferencePair
from rlhf_core.reward import RewardFunction, pair_rewards
from rlhf_core.sft import sft_loss


def synthetic_rows(n: int, response_words: int, rng: random.Random) -> list[tuple[str, str]]:
    """Toy-world prompts with long responses of toy words (the throughput, not the text, matters here)."""
    vocabulary = [w for words in world.TOPICS.values() for w in words] + list(world.FILLER)
    prompts = world.all_prompts()
    return [(rng.choice(prompts), " ".join(rng.choices(vocabulary, k=response_words))) for _ in range(n)]


def timed(step: Callable[[], int], device: torch.device) -> tuple[float, int]:
    """Run a warm-up step, then time one: seconds and the tokens it processed."""
    step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    tokens = step()
    sync()
    return time.perf_counter() - start, tokens


def report(name: str, seconds: float, tokens: int, flops: float, *, args: argparse.Namespace, device) -> None:
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    mfu = flops / seconds / (args.peak_tflops * 1e12)
    print(f"{name:<8} {seconds:8.2f} s  {tokens / seconds:10.0f} tokens/s  peak {peak:6.1f} GiB  MFU {mfu:6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1280)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="Sequences per step.")
    parser.add_argument("--seq", type=int, default=512, help="Prompt + response tokens per sequence.")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="Peak dense FLOP/s of the device, in T.")
    parser.add_argument("--tiny", action="store_true", help="A 2-layer, 64-wide model: a smoke run.")
    args = parser.parse_args()
    if args.tiny:
        args.hidden, args.layers, args.heads, args.batch, args.seq = 64, 2, 2, 4, 64
    device = torch.device(args.device)
    rng = random.Random(0)
    tokenizer = world.build_tokenizer()
    shape = world.WorldConfig(
        hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads, max_position_embeddings=args.seq
    )
    policy = disable_dropout(world.build_model(tokenizer, shape, seed=0)).to(device)
    n_params = sum(p.numel() for p in policy.parameters())
    print(
        f"Llama {args.layers} layers x {args.hidden} wide: {n_params / 1e6:.0f}M parameters; batch {args.batch} x "
        f"{args.seq} tokens; ZeRO-{args.zero_stage}, {args.precision}; {device} "
        f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'})"
    )
    zero = DeepSpeedConfig(zero_stage=args.zero_stage, precision=args.precision)
    rows = synthetic_rows(4 * args.batch, args.seq - 16, rng)

    optimization = Optimization(lr=1e-5, total_steps=100)
    engine = DeepSpeedEngine(policy, zero, optimization, micro_batch_size=args.batch)

    def sft_step() -> int:
        batch_rows = rng.sample(rows, args.batch)
        batch = encode_prompt_responses(tokenizer, *map(list, zip(*batch_rows, strict=True)), args.seq, device=device)
        engine.backward(sft_loss(engine.module, batch))
        engine.step()
        return int(batch.attention_mask.sum())

    seconds, tokens = timed(sft_step, device)
    report("sft", seconds, tokens, 6 * n_params * tokens, args=args, device=device)

    scorer_config = copy.deepcopy(policy.config)
    scorer_config.num_labels = 1

    def new_scorer() -> torch.nn.Module:
        return disable_dropout(AutoModelForSequenceClassification.from_config(scorer_config)).to(device)

    scorer = new_scorer()
    rm_engine = DeepSpeedEngine(scorer, zero, optimization, micro_batch_size=2 * args.batch)
    pairs = [PreferencePair(p, r, r[::-1], "bench", 0.0, 0.0) for p, r in rows]

    def reward_step() -> int:
        chosen, rejected = pair_rewards(rm_engine.module, tokenizer, rng.sample(pairs, args.batch), args.seq)
        rm_engine.backward(bradley_terry_loss(chosen, rejected))
        rm_engine.step()
        return 2 * args.batch * args.seq

    seconds, tokens = timed(reward_step, device)
    report("reward", seconds, tokens, 6 * n_params * tokens, args=args, device=device)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    reference = disable_dropout(world.build_model(tokenizer, shape, seed=0)).to(device, dtype).eval()
    reward_model = new_scorer().to(dtype).eval()
    critic = new_scorer()
    critic_engine = DeepSpeedEngine(critic, zero, optimization, micro_batch_size=args.batch)
    config = PPOConfig(
        steps=1, rollout_batch_size=args.batch, minibatch_size=args.batch, epochs=1, max_new_tokens=args.seq // 2,
        max_kl=None,
    )  # fmt: skip
    prompts = [p for p, _ in rows]
    lengths: list[float] = []

    def ppo_step() -> int:
        reward_fn, seed = RewardFunction(reward_model), rng.randrange(2**31)
        models = PPOModels(engine, critic_engine, reference, reward_fn)
        result = train_ppo(models, tokenizer, prompts, config, seed=seed)
        lengths.append(result.history[-1]["response_length"])
        prompt_tokens = 12  # a toy prompt is about a dozen tokens
        return int(args.batch * (prompt_tokens + lengths[-1]))

    seconds, tokens = timed(ppo_step, device)
    generated = args.batch * lengths[-1]
    flops = n_params * (2 * generated + 4 * 2 * tokens + 2 * 6 * tokens * config.epochs)
    report("ppo", seconds, tokens, flops, args=args, device=device)


if __name__ == "__main__":
    main()
