"""The real-model benchmark: the instruction-following example (SmolLM2-135M-Instruct, IFEval's verifiable
constraints as the judge), SFT then its iterations, in-process through the phase functions the Prefect tasks call
(``bench.quality``'s harness), with what a user of the example wants to know printed per iteration.

    python -m bench.real_model [--config examples/instruction-following/config.yaml] [--set ppo.steps=4 ...]

Per iteration: strict and loose instruction-following accuracy on the held-out prompts (the judge's share of each
prompt's constraints met, averaged; the SFT model's beside it) and on a sample of IFBench's out-of-distribution
prompts; the win rate against the SFT model by the judge with its standard error; KL to SFT; response length and EOS
rate. Per phase: wall time. For SFT: tokens/s and MFU against the fp32 matmul peak measured here first (2048^3, best
of five). The whole run's peak resident memory. Builds the example first where ``build/`` lacks it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
import transformers

from bench.quality import run_seed
from flows.config import load_config
from infra.artifacts import BASE_MODEL_DIR, read_as_written, read_demonstrations
from infra.sources import chat_renderer
from rlhf_core.judge import gold_judge
from rlhf_core.modeling import load_policy, load_tokenizer, prompt_token_ids, sample_responses

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "instruction-following"
sys.path.insert(0, str(EXAMPLE))

import build  # noqa: E402
import instruction_judge  # noqa: E402


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` fp32 ``n``^3 matmuls on this machine's torch threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = min(_timed_matmul(a, b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed_matmul(a: torch.Tensor, b: torch.Tensor) -> float:
    start = time.perf_counter()
    a @ b
    return time.perf_counter() - start


@contextmanager
def peak_rss(into: dict[str, float], name: str, every_s: float = 0.2) -> Iterator[None]:
    """The largest resident memory of this process while the block runs, in GiB, as ``into[name]``."""
    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(every_s):
            peak[0] = max(peak[0], process.memory_info().rss)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        into[name] = max(peak[0], process.memory_info().rss) / 2**30


def ifbench_accuracy(policy_dir: Path, prompts: list[str], *, max_new_tokens: int, batch_size: int) -> dict:
    """Strict and loose accuracy of one sample per IFBench prompt (at temperature 1, as the evaluation samples)."""
    tokenizer, model = load_tokenizer(policy_dir), load_policy(policy_dir).eval()
    render = chat_renderer(tokenizer)
    rendered = [render([{"role": "user", "content": p}]) for p in prompts]
    texts = []
    for i in range(0, len(rendered), batch_size):
        texts += sample_responses(model, tokenizer, rendered[i : i + batch_size], max_new_tokens).texts
    strict, loose = instruction_judge.score(prompts, texts), instruction_judge.score_loose(prompts, texts)
    return {"ifbench_strict": sum(strict) / len(strict), "ifbench_loose": sum(loose) / len(loose)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=EXAMPLE / "config.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    parser.add_argument("--ifbench", type=int, default=64, help="IFBench prompts sampled per iteration (0: none)")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    os.environ.setdefault(instruction_judge.DATA_ENV, str(build.BUILD))
    build.main([])
    config = load_config(args.config, args.overrides)
    peak = matmul_peak()
    print(
        f"fp32 matmul peak here: {peak / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} threads; "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    ifbench_rows = [json.loads(line) for line in (build.BUILD / "ifbench_eval.jsonl").read_text().splitlines()]
    ifbench = [row["prompt"] for row in ifbench_rows][: args.ifbench]
    seconds, memory = {}, {}

    def observe(k: int, it: Path, samples: list[dict]) -> dict[str, float]:
        """Loose accuracy beside the strict one (the evaluation's gold reward), and IFBench's."""
        loose = gold_judge("instruction_judge:score_loose", read_as_written(it.parent / "data"))
        prompts = [row["prompt"] for row in samples]
        figures = {
            "strict": _mean([row["policy_gold"] for row in samples]),
            "loose": _mean(loose(prompts, [row["policy"] for row in samples])),
            "sft_strict": _mean([row["sft_gold"] for row in samples]),
            "sft_loose": _mean(loose(prompts, [row["sft"] for row in samples])),
        }
        if ifbench:
            figures |= ifbench_accuracy(
                it / "policy", ifbench, max_new_tokens=config.evaluation.max_new_tokens, batch_size=32
            )
        return figures

    with tempfile.TemporaryDirectory(prefix="rlhf-real-") as tmp, peak_rss(memory, "whole run"):
        root = Path(tmp)
        rows = run_seed(config, root, observe=observe, seconds=seconds)
        sft_mfu = _sft_mfu(root, config, seconds["sft"], peak)
    print("\nper iteration: strict / loose accuracy (SFT's), IFBench strict / loose, win rate ± s.e., KL, length, EOS")
    for row in rows:
        print(
            f"  {row['iteration']}: {row['strict']:.3f} / {row['loose']:.3f} ({row['sft_strict']:.3f} / "
            f"{row['sft_loose']:.3f})  IFBench {row.get('ifbench_strict', float('nan')):.3f} / "
            f"{row.get('ifbench_loose', float('nan')):.3f}  win {row['win_rate_vs_sft']:.3f} ± "
            f"{row['win_rate_stderr']:.3f}  KL {row['kl']:.2f}  length {row['response_length']:.1f}  "
            f"EOS {row['eos_rate']:.2f}"
        )
    print("\nseconds by phase: " + "  ".join(f"{name}={s:.0f}" for name, s in seconds.items()))
    print(f"SFT: {sft_mfu['tokens_per_s']:.0f} tokens/s, MFU {sft_mfu['mfu']:.1%} of the matmul peak")
    print(f"peak resident memory, whole run: {memory['whole run']:.2f} GiB")
    print(f"total: {rows[-1]['total_s'] / 60:.1f} min")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _sft_mfu(root: Path, config, seconds: float, peak: float) -> dict[str, float]:
    """SFT's tokens/s and model FLOP utilization: 6 x parameters x tokens trained, over its wall time and the
    measured matmul peak (attention's FLOPs left out, as MFU usually does)."""
    data = root / "data"
    tokenizer, model = load_tokenizer(data / BASE_MODEL_DIR), load_policy(data / BASE_MODEL_DIR)
    demos = read_demonstrations(data)
    tokens = (
        sum(
            min(config.sft.max_length, len(prompt_token_ids(tokenizer, p)) + len(tokenizer(r)["input_ids"]) + 1)
            for p, r in demos
        )
        * config.sft.epochs
    )
    params = sum(p.numel() for p in model.parameters())
    return {"tokens_per_s": tokens / seconds, "mfu": 6 * params * tokens / seconds / peak}


if __name__ == "__main__":
    main()
