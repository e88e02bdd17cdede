"""Data preparation: the prompt splits, the demonstrations, any human preferences, the gold judge and the base
model, as one artifact. By default all of it is the built-in toy world; ``data.prompts`` and friends bring yours."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from infra.datasets import DatasetError, read_rows, read_text_table, write_rows
from infra.storage import folder_digest
from rlhf_core import world
from rlhf_core.modeling import load_policy, load_tokenizer
from rlhf_core.preferences import GoldScorer
from rlhf_core.world import WorldConfig
from tasks.common import PhaseOutput, RunContext, artifact_key, existing_output, phase_task, publish

SPLITS = ("sft", "preference", "ppo", "eval")
USER_SPLITS = SPLITS[1:]  # the SFT split is the demonstrations' prompts
JUDGE_FILE = "judge.json"
PAIRS_FILE = "preferences.parquet"  # preference pairs, human or collected
REWARD_BASE_DIR = "reward_base_model"  # a separate reward-model backbone, when data.reward_model names one
_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class DataConfig(BaseModel):
    """Where prompts, demonstrations, the gold judge and the base model come from (default: the toy world)."""

    model_config = ConfigDict(extra="forbid")
    world: WorldConfig = Field(
        default_factory=WorldConfig, description="Size of the generated toy world and of its tiny Llama."
    )
    base_model: str | None = Field(
        None,
        description="Start from this causal LM (hub id or local save_pretrained folder, any architecture) instead "
        "of the toy world's tiny Llama; its own tokenizer is used. Null: build the tiny Llama.",
    )
    reward_model: str | None = Field(
        None,
        description="Start the reward model from this model instead of the SFT model (hub id or local "
        "save_pretrained folder, any architecture) with its own tokenizer: text is re-tokenized for it, and PPO's "
        "critic then starts from the SFT model. Null: the reward model and the critic start from the SFT model.",
    )
    prompts: str | None = Field(
        None,
        description="Your prompts: a .parquet or .jsonl file with a text column 'prompt' and an optional 'split' "
        "column (preference, ppo or eval); without it a prompt's split comes from a hash of its text (40% "
        "preference, 40% ppo, 20% eval). Needs data.demonstrations and data.gold_reward. Null: the toy world's.",
    )
    demonstrations: str | None = Field(
        None,
        description="Your SFT demonstrations: a .parquet or .jsonl file with text columns 'prompt' and 'response'. "
        "Goes with data.prompts.",
    )
    human_preferences: str | None = Field(
        None,
        description="Human preference pairs: a .parquet or .jsonl file with text columns 'prompt', 'chosen' and "
        "'rejected', added to every reward model's training data besides the pairs collected each iteration.",
    )
    gold_reward: str | None = Field(
        None,
        description="'package.module:function' taking (prompts, responses) and returning one float per response: "
        "the hidden judge of the simulated labelers and of evaluation. Required with data.prompts; null: the toy "
        "world's gold reward, which only knows toy prompts.",
    )

    @field_validator("gold_reward")
    @classmethod
    def _import_path(cls, spec: str | None) -> str | None:
        if spec is not None and not _IMPORT_PATH.fullmatch(spec):
            raise ValueError(f"expected 'package.module:function', got {spec!r}")
        return spec

    @model_validator(mode="after")
    def _user_data_goes_together(self) -> DataConfig:
        if (self.prompts is None) != (self.demonstrations is None):
            missing = "data.demonstrations" if self.demonstrations is None else "data.prompts"
            raise ValueError(f"{missing} is required too: your prompts and demonstrations go together")
        if self.prompts is not None and self.gold_reward is None:
            raise ValueError(
                "data.gold_reward is required with data.prompts: the toy world's gold reward only judges toy prompts"
            )
        return self

    @property
    def user_files(self) -> dict[str, str]:
        """The user's dataset files by field name."""
        files = {
            "prompts": self.prompts,
            "demonstrations": self.demonstrations,
            "human_preferences": self.human_preferences,
        }
        return {name: path for name, path in files.items() if path is not None}


def load_gold_scorer(spec: str | None) -> GoldScorer:
    """The gold judge named ``'package.module:function'``, or the toy world's for None."""
    if spec is None:
        return world.gold_rewards
    module_name, _, attr = spec.partition(":")
    try:
        scorer = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"data.gold_reward={spec!r}: cannot import it: {e}") from e
    if not callable(scorer):
        raise ValueError(f"data.gold_reward={spec!r}: not a function")
    return scorer


def data_judge(data_dir: Path) -> GoldScorer:
    """The gold judge a data artifact was prepared with."""
    path = data_dir / JUDGE_FILE
    return load_gold_scorer(json.loads(path.read_text())["gold_reward"] if path.exists() else None)


def save_base_model(directory: Path, seed: int, config: WorldConfig) -> Path:
    """The untrained toy tokenizer and tiny Llama as a ``save_pretrained`` folder, loadable with Auto*."""
    tokenizer = world.build_tokenizer()
    world.build_model(tokenizer, config, seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def copy_base_model(
    directory: Path, name_or_path: str, trust_remote_code: bool = False, field: str = "data.base_model"
) -> Path:
    """Any causal LM and its tokenizer, re-saved as a safetensors ``save_pretrained`` folder; errors name ``field``."""
    try:
        tokenizer = load_tokenizer(name_or_path, trust_remote_code)
        model = load_policy(name_or_path, trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"{field}={name_or_path!r}: cannot load a causal LM and tokenizer from it: {e}") from e
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@dataclass
class Dataset:
    """Prompts by split, (prompt, response) demonstrations and human preference rows, ready to write."""

    prompts: dict[str, list[str]]
    demonstrations: list[tuple[str, str]]
    preferences: list[dict] = field(default_factory=list)


def _split_of(prompt: str) -> str:
    """A stable 40/40/20 preference/ppo/eval split from the prompt's text alone."""
    bucket = hashlib.sha256(prompt.encode()).digest()[0] % 10
    return "preference" if bucket < 4 else "ppo" if bucket < 8 else "eval"


class _RowChecker:
    """Checks rows of one file against the tokenizer's vocabulary and the longest sequence training keeps."""

    def __init__(self, tokenizer, max_tokens: int | None) -> None:
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def tokens(self, path: str, number: int, column: str, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.tokenizer.unk_token_id is not None and self.tokenizer.unk_token_id in ids:
            unknown = [w for w in text.split() if self.tokenizer.unk_token_id in self.tokenizer(w)["input_ids"]]
            raise DatasetError(
                f"{path}: row {number}, column {column!r}: words the tokenizer does not know: {unknown[:5]}"
            )
        return len(ids)

    def fits(self, path: str, number: int, row: dict[str, str], columns: tuple[str, ...]) -> None:
        """Prompt + longest of ``columns`` + BOS and EOS must fit ``max_tokens``."""
        prompt = self.tokens(path, number, "prompt", row["prompt"])
        for column in columns:
            total = prompt + self.tokens(path, number, column, row[column]) + 2
            if self.max_tokens is not None and total > self.max_tokens:
                raise DatasetError(
                    f"{path}: row {number}, column {column!r}: prompt + {column} is {total} tokens, more than the "
                    f"{self.max_tokens} that training keeps (sft.max_length / reward.max_length)"
                )


def _gold(judge: GoldScorer, spec: str | None, path: str, prompts: list[str], responses: list[str]) -> list[float]:
    try:
        scores = [float(s) for s in judge(prompts, responses)]
    except (ValueError, TypeError) as e:
        raise DatasetError(f"{path}: data.gold_reward={spec!r} cannot score these rows: {e}") from e
    if len(scores) != len(prompts) or not all(math.isfinite(s) for s in scores):
        raise DatasetError(f"{path}: data.gold_reward={spec!r} must return one finite float per response")
    return scores


def read_user_data(config: DataConfig, tokenizer, max_tokens: int | None) -> Dataset:
    """Read and check the user's files; DatasetError names the file, row and column of the first problem."""
    check = _RowChecker(tokenizer, max_tokens)
    prompts: dict[str, list[str]] = {split: [] for split in SPLITS}
    demonstrations: list[tuple[str, str]] = []
    if config.prompts is not None and config.demonstrations is not None:
        for number, row in enumerate(read_text_table(Path(config.prompts), ("prompt",), ("split",)), start=1):
            split = row.get("split", _split_of(row["prompt"]))
            if split not in USER_SPLITS:
                raise DatasetError(
                    f"{config.prompts}: row {number}, column 'split': {split!r} is not one of {list(USER_SPLITS)}"
                )
            if check.tokens(config.prompts, number, "prompt", row["prompt"]) + 3 > (max_tokens or math.inf):
                raise DatasetError(f"{config.prompts}: row {number}, column 'prompt': leaves no room for a response")
            prompts[split].append(row["prompt"])
        for split in USER_SPLITS:
            if not prompts[split]:
                raise DatasetError(f"{config.prompts}: no {split!r} prompts; every split needs some")
        rows = read_text_table(Path(config.demonstrations), ("prompt", "response"))
        for number, row in enumerate(rows, start=1):
            check.fits(config.demonstrations, number, row, ("response",))
        demonstrations = [(row["prompt"], row["response"]) for row in rows]
        prompts["sft"] = list(dict.fromkeys(p for p, _ in demonstrations))
    preferences = []
    if config.human_preferences is not None:
        path = config.human_preferences
        rows = read_text_table(Path(path), ("prompt", "chosen", "rejected"))
        for number, row in enumerate(rows, start=1):
            if row["chosen"].strip() == row["rejected"].strip():
                raise DatasetError(f"{path}: row {number}, column 'rejected': identical to 'chosen'")
            check.fits(path, number, row, ("chosen", "rejected"))
        judge, pair_prompts = load_gold_scorer(config.gold_reward), [row["prompt"] for row in rows]
        chosen_gold = _gold(judge, config.gold_reward, path, pair_prompts, [r["chosen"] for r in rows])
        rejected_gold = _gold(judge, config.gold_reward, path, pair_prompts, [r["rejected"] for r in rows])
        preferences = [
            {**row, "labeler": "human", "chosen_gold": c, "rejected_gold": r}
            for row, c, r in zip(rows, chosen_gold, rejected_gold, strict=True)
        ]
    return Dataset(prompts, demonstrations, preferences)


def model_tokenizer(name_or_path: str, field: str, trust_remote_code: bool = False):
    """The tokenizer of a named model, without loading its weights; errors name the config ``field``."""
    try:
        return load_tokenizer(name_or_path, trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"{field}={name_or_path!r}: cannot load its tokenizer: {e}") from e


def base_tokenizer(config: DataConfig, trust_remote_code: bool = False):
    """The tokenizer the base model will have, without loading its weights."""
    if config.base_model is None:
        return world.build_tokenizer()
    return model_tokenizer(config.base_model, "data.base_model", trust_remote_code)


def check_data(
    config: DataConfig, seed: int, trust_remote_code: bool = False, max_tokens: int | None = None
) -> Dataset:
    """Everything the data phase will write, read and checked first: run it before anything is written."""
    if config.gold_reward is not None:
        load_gold_scorer(config.gold_reward)
    if config.reward_model is not None:
        model_tokenizer(config.reward_model, "data.reward_model", trust_remote_code)
    dataset = read_user_data(config, base_tokenizer(config, trust_remote_code), max_tokens)
    if config.prompts is None:
        generated = world.make_world(seed, config.world)
        dataset.demonstrations = generated.demonstrations
        splits = (generated.sft_prompts, generated.preference_prompts, generated.ppo_prompts, generated.eval_prompts)
        dataset.prompts = dict(zip(SPLITS, splits, strict=True))
    return dataset


def write_data(
    out_dir: Path, seed: int, config: DataConfig, trust_remote_code: bool = False, max_tokens: int | None = None
) -> dict[str, float]:
    """Check, then write into ``out_dir``: base_model/, prompts.parquet, demonstrations.parquet, the judge's name
    and, when given, the reward model's backbone and the human preferences."""
    dataset = check_data(config, seed, trust_remote_code, max_tokens)
    if config.base_model is None:
        save_base_model(out_dir / "base_model", seed, config.world)
    else:
        copy_base_model(out_dir / "base_model", config.base_model, trust_remote_code)
    if config.reward_model is not None:
        copy_base_model(out_dir / REWARD_BASE_DIR, config.reward_model, trust_remote_code, "data.reward_model")
    prompt_rows = [{"split": s, "prompt": p} for s in SPLITS for p in dataset.prompts[s]]
    write_rows(out_dir / "prompts.parquet", prompt_rows)
    write_rows(out_dir / "demonstrations.parquet", [{"prompt": p, "response": r} for p, r in dataset.demonstrations])
    if dataset.preferences:
        write_rows(out_dir / PAIRS_FILE, dataset.preferences)
    (out_dir / JUDGE_FILE).write_text(json.dumps({"gold_reward": config.gold_reward}))
    return {
        "data/demonstrations": len(dataset.demonstrations),
        "data/eval_prompts": len(dataset.prompts["eval"]),
        "data/human_preferences": len(dataset.preferences),
    }


def reward_init_dir(data_dir: Path, sft_dir: Path) -> Path:
    """Where the reward model starts: the separate backbone the data phase saved, else the SFT model."""
    separate = data_dir / REWARD_BASE_DIR
    return separate if separate.is_dir() else sft_dir


def read_prompts(data_dir: Path, split: str) -> list[str]:
    return [row["prompt"] for row in read_rows(data_dir / "prompts.parquet") if row["split"] == split]


def read_demonstrations(data_dir: Path) -> list[tuple[str, str]]:
    return [(row["prompt"], row["response"]) for row in read_rows(data_dir / "demonstrations.parquet")]


def local_inputs_digest(config: DataConfig) -> str | None:
    """Digest of the local things the data phase reads (base- and reward-model folders, the user's files, the judge's
    source), so editing any of them in place invalidates the cache. None when there are none."""
    parts = [
        f"{name}={folder_digest(Path(model))}"
        for name, model in (("base_model", config.base_model), ("reward_model", config.reward_model))
        if model is not None and Path(model).is_dir()
    ]
    for name, path in config.user_files.items():
        content = hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).is_file() else "missing"
        parts.append(f"{name}={content}")
    if config.gold_reward is not None:
        try:
            source = inspect.getsource(inspect.getmodule(load_gold_scorer(config.gold_reward)))
        except (OSError, TypeError):  # no source to read: the name is all there is
            source = config.gold_reward
        parts.append(f"gold_reward={hashlib.sha256(source.encode()).hexdigest()}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest() if parts else None


@phase_task("prepare-data")
def prepare_data(
    context: RunContext,
    config: DataConfig,
    seed: int,
    inputs_digest: str | None = None,
    max_tokens: int | None = None,
) -> PhaseOutput:
    """``inputs_digest`` (see :func:`local_inputs_digest`) puts the content of local inputs in the cache key;
    ``max_tokens`` is the longest prompt + response training keeps, which every user row must fit."""
    inputs = {"config": config, "seed": seed, "inputs_digest": inputs_digest, "max_tokens": max_tokens}
    key = artifact_key(context, "data", "world", inputs)
    if done := existing_output(context, key):
        return done
    with tempfile.TemporaryDirectory(prefix="rlhf-data-") as tmp:
        metrics = write_data(Path(tmp), seed, config, context.trust_remote_code, max_tokens)
        return publish(
            context, key, Path(tmp), {"phase": "prepare-data", "config": config.model_dump(), "seed": seed}, metrics
        )
