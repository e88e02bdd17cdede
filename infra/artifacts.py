"""What each phase's artifact folder holds: the file names, and the readers every later phase uses.

data/        base_model/, prompts.parquet (split, prompt, and prompt_as_written where a chat template rendered
             them), demonstrations.parquet (prompt, response), judge.json, and optionally reward_base_model/,
             preferences.parquet (human pairs) and sources.json
sft/, policy/, reward_model/    save_pretrained folders (a LoRA policy adds adapter/)
preferences/ preferences.parquet (prompt, chosen, rejected, labeler, chosen_gold, rejected_gold)
sft/baseline-*  baseline.parquet: the SFT model's held-out responses, sampled once, every evaluation's baseline
evaluation/  metrics.json, samples.parquet
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from infra.datasets import read_rows
from rlhf_core.data import load_gold_breakdown
from rlhf_core.judge import gold_judge
from rlhf_core.preferences import PreferencePair
from rlhf_core.types import GoldBreakdown, GoldScorer

SPLITS = ("sft", "preference", "ppo", "eval")
USER_SPLITS = SPLITS[1:]  # the SFT split is the demonstrations' prompts
BASE_MODEL_DIR = "base_model"
REWARD_BASE_DIR = "reward_base_model"  # a separate reward-model backbone, when data.reward_model names one
PROMPTS_FILE = "prompts.parquet"
AS_WRITTEN = "prompt_as_written"  # a prompts-table column where the chat template changed it: the user's text
DEMONSTRATIONS_FILE = "demonstrations.parquet"
JUDGE_FILE = "judge.json"
SOURCES_FILE = "sources.json"  # data field -> where the user's dataset was read (hub commit pinned)
PAIRS_FILE = "preferences.parquet"  # preference pairs, human or collected
METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.parquet"
BASELINE_FILE = "baseline.parquet"  # the SFT model's held-out responses (prompt, sft, sft_gold)


@dataclass(frozen=True)
class PhaseInputs:
    """The local folders of the artifacts a policy-side phase reads (preferences, PPO, evaluation)."""

    data: Path
    policy: Path
    sft: Path | None = None
    reward: Path | None = None


def read_prompts(data_dir: Path, split: str) -> list[str]:
    return [row["prompt"] for row in read_rows(data_dir / PROMPTS_FILE) if row["split"] == split]


def read_demonstrations(data_dir: Path) -> list[tuple[str, str]]:
    return [(row["prompt"], row["response"]) for row in read_rows(data_dir / DEMONSTRATIONS_FILE)]


def read_pairs(pairs_dir: Path) -> list[PreferencePair]:
    return [PreferencePair(**row) for row in read_rows(pairs_dir / PAIRS_FILE)]


def _judge_spec(data_dir: Path) -> str | None:
    path = data_dir / JUDGE_FILE
    return json.loads(path.read_text())["gold_reward"] if path.exists() else None


def data_judge(data_dir: Path) -> GoldScorer:
    """The gold judge a data artifact was prepared with, checked on every call (:mod:`rlhf_core.judge`), reading each
    prompt as the user wrote it where the data phase kept that."""
    return gold_judge(_judge_spec(data_dir), read_as_written(data_dir))


def read_as_written(data_dir: Path) -> dict[str, str]:
    """Each prompt in the model's chat format -> as the user wrote it, where the data phase kept that."""
    rows = read_rows(data_dir / PROMPTS_FILE)
    return {row["prompt"]: row[AS_WRITTEN] for row in rows if row.get(AS_WRITTEN) is not None}


def data_judge_breakdown(data_dir: Path) -> GoldBreakdown | None:
    """That judge's reward attribute by attribute, where it has attributes (the toy world's)."""
    return load_gold_breakdown(_judge_spec(data_dir))


def reward_init_dir(data_dir: Path, sft_dir: Path) -> Path:
    """Where the reward model starts: the separate backbone the data phase saved, else the SFT model."""
    separate = data_dir / REWARD_BASE_DIR
    return separate if separate.is_dir() else sft_dir
