"""GPU check: one SFT, one reward-model and one PPO step on a ~0.5B-parameter Llama built from a config (random
weights: nothing to download), each under DeepSpeed ZeRO-2 with bf16, as one rank per GPU: two ranks where the
machine has two or more GPUs (the check re-launches itself under ``torch.distributed.run``), else one. Each rank
trains on its share of every batch (PPO: of the rollout batch, ``rollout_batch_size`` being the global batch);
rank 0 prints tokens/s, the peak GPU memory of the fullest rank and MFU per phase, for the whole world. Each phase
runs a warm-up step first; the figures are of the step after it.

    python -m bench.gpu_check                                        # the GPUs here, offline, a minute or two
    python -m bench.gpu_check --tiny --device cpu --precision fp32   # a smoke run anywhere
    OMP_NUM_THREADS=1 python -m bench.gpu_check --tiny --device cpu --precision fp32 --ranks 2  # 2 ranks, gloo

Model FLOPs: training 6 x parameters per token (forward and backward). A PPO step counts generation
(2 x parameters per generated token), the four scoring forwards over the rollout (policy, reference, critic,
reward model: 2 x parameters per token each) and the policy and critic updates (6 x parameters per token each,
per pass over the rollout). MFU divides by ``--peak-tflops`` per rank: default 790, the bf16 rate of an 8192^3 matmul
on an H200 as the notes on that machine record it (not the 989 of the data sheet); this check has not yet run on a GPU.

Only torch, transformers, pydantic and (when an engine is built) DeepSpeed are imported along the way: no prefect,
mlflow or boto3 (bench/gpu_run.sh runs it on a GPU image that lacks them).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import distributed as dist
from transformers import AutoModelForSequenceClassification

from infra.deepspeed_config import DeepSpeedConfig
from infra.deepspeed_engine import DeepSpeedEngine, inference_module
from rlhf_core import world
from rlhf_core.config import PPOConfig, SFTConfig
from rlhf_core.engine import Optimization, rank_rows
from rlhf_core.losses import bradley_terry_loss
from rlhf_core.modeling import disable_dropout, prompt_token_ids
from rlhf_core.ppo import PPOModels, train_ppo
from rlhf_core.preferences import PreferencePair
from rlhf_core.reward import RewardFunction, pair_rewards
from rlhf_core.sft import sft_loss, shard_batch

LAUNCHED = "TORCHELASTIC_RUN_ID"  # set by torch.distributed.run in every rank it starts


@dataclass(frozen=True)
class World:
    """This process's place among the ranks, and the device it computes on."""

    rank: int
    size: int
    device: torch.device

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order."""
        if self.size == 1:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def default_ranks(device: str) -> int:
    """Two ranks where there are two GPUs or more (the check's multi-rank case), else one."""
    return 2 if device.startswith("cuda") and torch.cuda.device_count() >= 2 else 1


def relaunch(ranks: int) -> int:
    """Run this check again as ``ranks`` processes under torch.distributed.run; its exit status."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    return subprocess.call([*command, "-m", "bench.gpu_check", *sys.argv[1:]])


def setup_world(device: str) -> World:
    """This rank's world: one process, or one of torch.distributed.run's ranks on GPU ``LOCAL_RANK`` (NCCL) or on
    the CPU (gloo). The process group is created here so that the figures can be gathered before DeepSpeed runs."""
    if LAUNCHED not in os.environ:
        return World(0, 1, torch.device(device))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return World(dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank))
    dist.init_process_group("gloo")
    return World(dist.get_rank(), dist.get_world_size(), torch.device("cpu"))


def synthetic_rows(n: int, response_words: int, rng: random.Random) -> list[tuple[str, str]]:
    """Toy-world prompts with long responses of toy words (the throughput, not the text, matters here)."""
    vocabulary = [w for words in world.TOPICS.values() for w in words] + list(world.FILLER)
    prompts = world.all_prompts()
    return [(rng.choice(prompts), " ".join(rng.choices(vocabulary, k=response_words))) for _ in range(n)]


def timed(step: Callable[[], int], ranks: World) -> tuple[float, int]:
    """Run a warm-up step, then time one, from the moment every rank is ready to the moment the last is done:
    seconds, and the tokens this rank processed."""
    step()
    cuda = ranks.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ranks.barrier()
    start = time.perf_counter()
    tokens = step()
    if cuda:
        torch.cuda.synchronize()
    ranks.barrier()
    return time.perf_counter() - start, tokens


def report(name: str, seconds: float, tokens: int, flops: float, *, peak_tflops: float, ranks: World) -> None:
    """Print (rank 0) one phase's figures for the whole world: ``tokens`` and ``flops`` are this rank's."""
    peak = torch.cuda.max_memory_allocated() / 2**30 if ranks.device.type == "cuda" else float("nan")
    shares = ranks.gather((seconds, tokens, flops, peak))
    if ranks.rank != 0:
        return
    seconds = max(s for s, *_ in shares)
    tokens, flops = sum(t for _, t, _, _ in shares), sum(f for *_, f, _ in shares)
    peak = max(p for *_, p in shares)
    mfu = flops / seconds / (peak_tflops * 1e12 * ranks.size)
    print(
        f"{name:<8} {seconds:8.2f} s  {tokens / seconds:10.0f} tokens/s  peak {peak:6.1f} GiB/rank  MFU {mfu:6.1%}",
        flush=True,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1280)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="Sequences per step, over all ranks.")
    parser.add_argument("--seq", type=int, default=512, help="Prompt + response tokens per sequence.")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--ranks", type=int, default=None, help="Data-parallel ranks (default: 2 with two GPUs or more, else 1)."
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=790.0, help="Peak dense FLOP/s of one device, in T (default: H200 bf16)."
    )
    parser.add_argument("--tiny", action="store_true", help="A 2-layer, 64-wide model: a smoke run.")
    args = parser.parse_args()
    if args.tiny:
        args.hidden, args.layers, args.heads, args.batch, args.seq = 64, 2, 2, 4, 64
    return args


def main() -> int:
    args = parse_args()
    ranks_wanted = args.ranks or default_ranks(args.device)
    if ranks_wanted > 1 and LAUNCHED not in os.environ:
        return relaunch(ranks_wanted)
    ranks = setup_world(args.device)
    if args.batch % ranks.size:
        raise SystemExit(f"--batch {args.batch} does not split evenly over {ranks.size} ranks")
    device, say = ranks.device, print if ranks.rank == 0 else (lambda *_, **__: None)
    rng = random.Random(0)  # the same on every rank: each takes its share of the same batches
    tokenizer = world.build_tokenizer()
    shape = world.WorldConfig(
        hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads, max_position_embeddings=args.seq
    )
    with device:  # weights initialized where they will live: faster than on the CPU for a 0.5B model
        policy = disable_dropout(world.build_model(tokenizer, shape, seed=0)).to(device)
    n_params = sum(p.numel() for p in policy.parameters())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    say(
        f"Llama {args.layers} layers x {args.hidden} wide: {n_params / 1e6:.0f}M parameters; batch {args.batch} x "
        f"{args.seq} tokens over {ranks.size} rank(s); ZeRO-{args.zero_stage}, {args.precision}; {ranks.size} x "
        f"{device.type} ({gpu}); torch {torch.__version__}",
        flush=True,
    )
    zero = DeepSpeedConfig(zero_stage=args.zero_stage, precision=args.precision, num_processes=ranks.size)
    micro_batch = args.batch // ranks.size
    rows = synthetic_rows(4 * args.batch, args.seq - 16, rng)

    optimization = Optimization(lr=1e-5, total_steps=100)
    engine = DeepSpeedEngine(policy, zero, optimization, micro_batch_size=micro_batch)
    sft_config = SFTConfig(batch_size=args.batch, max_length=args.seq)

    def sft_step() -> int:
        index = torch.tensor(rng.sample(range(len(rows)), args.batch))
        batch, num_tokens, weight = shard_batch(tokenizer, rows, index, config=sft_config, engine=engine)
        engine.backward(sft_loss(engine.module, batch, num_tokens) * weight)
        engine.step()
        return int(batch.attention_mask.sum())

    seconds, tokens = timed(sft_step, ranks)
    report("sft", seconds, tokens, 6 * n_params * tokens, peak_tflops=args.peak_tflops, ranks=ranks)

    scorer_config = copy.deepcopy(policy.config)
    scorer_config.num_labels = 1

    def new_scorer() -> torch.nn.Module:
        with device:
            return disable_dropout(AutoModelForSequenceClassification.from_config(scorer_config)).to(device)

    scorer = new_scorer()
    rm_engine = DeepSpeedEngine(scorer, zero, optimization, micro_batch_size=2 * micro_batch)
    pairs = [PreferencePair(p, r, r[::-1], "bench", 0.0, 0.0) for p, r in rows]

    def reward_step() -> int:
        batch = rng.sample(pairs, args.batch)
        mine, weight = rank_rows(batch, rm_engine)
        chosen, rejected = pair_rewards(rm_engine.module, tokenizer, mine, args.seq)
        rm_engine.backward(bradley_terry_loss(chosen, rejected) * (weight * len(mine) / len(batch)))
        rm_engine.step()
        return 2 * len(mine) * args.seq

    seconds, tokens = timed(reward_step, ranks)
    report("reward", seconds, tokens, 6 * n_params * tokens, peak_tflops=args.peak_tflops, ranks=ranks)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    with device:
        reference = disable_dropout(world.build_model(tokenizer, shape, seed=0)).to(device, dtype).eval()
    reference = inference_module(reference, zero)  # sharded like the trained models under ZeRO-3
    reward_model = inference_module(new_scorer().to(dtype).eval(), zero)
    critic = new_scorer()
    critic_engine = DeepSpeedEngine(critic, zero, optimization, micro_batch_size=micro_batch)
    config = PPOConfig(
        steps=1, rollout_batch_size=args.batch, minibatch_size=args.batch, epochs=1, max_new_tokens=args.seq // 2,
        max_kl=None,
    )  # fmt: skip
    prompts = [p for p, _ in rows]
    prompt_tokens = sum(len(prompt_token_ids(tokenizer, p)) for p in prompts) / len(prompts)
    history: list[dict[str, float]] = []

    def ppo_step() -> int:
        reward_fn, seed = RewardFunction(reward_model), rng.randrange(2**31)
        models = PPOModels(engine, critic_engine, reference, reward_fn)
        history.append(train_ppo(models, tokenizer, prompts, config, seed=seed).history[-1])
        # the rollout is gathered on every rank: count this rank's share of the whole batch's tokens
        return round(args.batch * (prompt_tokens + history[-1]["response_length"]) / ranks.size)

    seconds, tokens = timed(ppo_step, ranks)
    generated = args.batch * history[-1]["response_length"] / ranks.size
    passes = history[-1]["minibatch_updates"] * config.minibatch_size / config.rollout_batch_size
    flops = n_params * (2 * generated + 4 * 2 * tokens + 2 * 6 * tokens * passes)
    report("ppo", seconds, tokens, flops, peak_tflops=args.peak_tflops, ranks=ranks)
    say(f"ppo: {history[-1]['response_length']:.0f} response tokens a sample on average", flush=True)
    if ranks.size > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
