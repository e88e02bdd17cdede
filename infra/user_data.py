"""The user's own data, checked before anything is written: every row of every source (a file, a hub dataset, a
dataset folder or an object in a bucket: infra/sources.py) against the base model's tokenizer and the longest
sequence training keeps, and the gold judge tried on it. DatasetError names the source, the row and the column of
the first problem."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from infra.artifacts import AS_WRITTEN, SPLITS, USER_SPLITS
from infra.datasets import DatasetError, text_rows
from infra.sources import (
    Source,
    StoreOpener,
    aws_env_store,
    chat_renderer,
    load_rows,
    resolve,
    to_columns,
)
from rlhf_core import world
from rlhf_core.data import DataConfig, load_gold_scorer
from rlhf_core.gguf_models import is_gguf, load_gguf_tokenizer
from rlhf_core.judge import CheckedJudge, JudgeError, gold_judge
from rlhf_core.modeling import load_tokenizer, with_pad_token


@dataclass
class Dataset:
    """Prompts by split, (prompt, response) demonstrations and human preference rows, ready to write."""

    prompts: dict[str, list[str]]
    demonstrations: list[tuple[str, str]]
    preferences: list[dict] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # data field -> where it was read (a hub commit pinned)
    as_written: dict[str, str] = field(default_factory=dict)  # prompt in the chat format -> as the user wrote it

    def judge(self, spec: str | None) -> CheckedJudge:
        """The gold judge, reading each prompt as the user wrote it."""
        return gold_judge(spec, self.as_written)


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


def _gold(judge: CheckedJudge, path: str, rows: list[dict[str, str]], column: str) -> list[float]:
    """The gold judge's score of each row's ``column`` as the response to its prompt."""
    prompts, responses = [row["prompt"] for row in rows], [row[column] for row in rows]
    try:
        return judge(prompts, responses)
    except JudgeError as e:
        raise DatasetError(f"{path}, column {column!r}: {e}") from e


JUDGE_TRIAL = 16  # (prompt, response) pairs the judge is tried on before a run


def try_judge(spec: str, dataset: Dataset, seed: int) -> None:
    """Call the gold judge on a sample of the run's own prompts and responses (demonstrations, and an empty response
    to an evaluation prompt, as a policy may give), before anything is written: a judge that returns too few scores,
    a non-number or a non-finite score, or raises, fails here with JudgeError rather than mid-run."""
    rng = random.Random(seed)
    pairs = rng.sample(dataset.demonstrations, min(JUDGE_TRIAL, len(dataset.demonstrations)))
    pairs += [(prompt, "") for prompt in dataset.prompts.get("eval", [])[:1]]
    if pairs:
        prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
        try:
            dataset.judge(spec)(prompts, responses)
        except JudgeError as e:
            tried = f"tried before the run on {len(pairs)} of the run's own prompts and responses"
            raise JudgeError(f"{e} ({tried})") from e


def read_source(
    config: DataConfig,
    name: str,
    tokenizer,
    open_store: StoreOpener,
    *,
    required: tuple[str, ...],
    optional: tuple[str, ...] = (),
) -> tuple[Source, list[dict[str, str]]]:
    """The data field ``name``'s rows in our text columns, its source resolved; DatasetError names source, row and
    column."""
    source = resolve(f"data.{name}", getattr(config, name), open_store)
    optional = (*optional, AS_WRITTEN)
    rows = load_rows(source, dataset_config=config.dataset_config, open_store=open_store)
    mapped = to_columns(
        rows,
        name=name,
        label=source.label,
        columns=config.columns,
        render=chat_renderer(tokenizer, use_template=config.chat_template),
    )
    return source, text_rows(source.label, mapped, required, optional)


def read_user_data(config: DataConfig, tokenizer, max_tokens: int | None, open_store: StoreOpener) -> Dataset:
    """Read and check the user's data; DatasetError names the source, row and column of the first problem."""
    check = _RowChecker(tokenizer, max_tokens)
    prompts: dict[str, list[str]] = {split: [] for split in SPLITS}
    demonstrations: list[tuple[str, str]] = []
    sources: dict[str, str] = {}
    as_written: dict[str, str] = {}
    if config.prompts is not None and config.demonstrations is not None:
        source, rows = read_source(config, "prompts", tokenizer, open_store, required=("prompt",), optional=("split",))
        label, sources["prompts"] = source.label, source.label
        for number, row in enumerate(rows, start=1):
            split = row.get("split", _split_of(row["prompt"]))
            if split not in USER_SPLITS:
                raise DatasetError(
                    f"{label}: row {number}, column 'split': {split!r} is not one of {list(USER_SPLITS)}"
                )
            if (tokens := check.tokens(label, number, "prompt", row["prompt"])) + 3 > (max_tokens or math.inf):
                raise DatasetError(
                    f"{label}: row {number}, column 'prompt': {tokens} tokens (in the model's chat format) leave no "
                    f"room for a response in the {max_tokens} that training keeps (sft.max_length / "
                    f"reward.max_length): raise both to at least the longest prompt plus the longest response"
                )
            prompts[split].append(row["prompt"])
            as_written[row["prompt"]] = row.get(AS_WRITTEN, row["prompt"])
        for split in USER_SPLITS:
            if not prompts[split]:
                raise DatasetError(f"{label}: no {split!r} prompts; every split needs some")
        source, rows = read_source(config, "demonstrations", tokenizer, open_store, required=("prompt", "response"))
        sources["demonstrations"] = source.label
        for number, row in enumerate(rows, start=1):
            check.fits(source.label, number, row, ("response",))
            as_written[row["prompt"]] = row.get(AS_WRITTEN, row["prompt"])
        demonstrations = [(row["prompt"], row["response"]) for row in rows]
        prompts["sft"] = list(dict.fromkeys(p for p, _ in demonstrations))
    preferences = []
    if config.human_preferences is not None:
        required = ("prompt", "chosen", "rejected")
        source, rows = read_source(config, "human_preferences", tokenizer, open_store, required=required)
        label = sources["human_preferences"] = source.label
        for number, row in enumerate(rows, start=1):
            if row["chosen"].strip() == row["rejected"].strip():
                raise DatasetError(f"{label}: row {number}, column 'rejected': identical to 'chosen'")
            check.fits(label, number, row, ("chosen", "rejected"))
            as_written[row["prompt"]] = row.get(AS_WRITTEN, row["prompt"])
        judge = gold_judge(config.gold_reward, as_written)
        chosen_gold = _gold(judge, label, rows, "chosen")
        rejected_gold = _gold(judge, label, rows, "rejected")
        preferences = [
            {
                **{k: v for k, v in row.items() if k != AS_WRITTEN},
                "labeler": "human",
                "chosen_gold": c,
                "rejected_gold": r,
            }
            for row, c, r in zip(rows, chosen_gold, rejected_gold, strict=True)
        ]
    kept = {prompt: text for prompt, text in as_written.items() if text != prompt}
    return Dataset(prompts, demonstrations, preferences, sources, kept)


def _hub_reachable(field: str, name: str) -> None:
    """ValueError at once where ``name`` is no local folder and the Hugging Face Hub cannot tell about it (no route,
    no such model, no access), unless the machine's hub cache holds it: otherwise loading it retries for a minute."""
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(name, timeout=10)
    except Exception as e:  # offline mode, no route, DNS, 401/404: all mean "cannot use it from here"
        try:
            load_tokenizer_offline(name)
        except (OSError, ValueError):
            raise ValueError(
                f"{field}={name!r}: no such local folder, and the Hugging Face Hub cannot provide it from here "
                f"({type(e).__name__}: {str(e)[:200]}); on a machine without hub access, download it elsewhere "
                f"(huggingface-cli download, or save_pretrained) and give {field} that folder"
            ) from e


def load_tokenizer_offline(name: str):
    """The tokenizer from the machine's hub cache alone."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, local_files_only=True)


def model_tokenizer(name_or_path: str, field: str, trust_remote_code: bool = False):
    """The tokenizer of a named model (a GGUF file's from its metadata), without loading its weights; errors name the
    config ``field``."""
    if is_gguf(name_or_path):
        return with_pad_token(load_gguf_tokenizer(name_or_path, field))
    if not Path(name_or_path).expanduser().exists():
        _hub_reachable(field, name_or_path)
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
    config: DataConfig,
    seed: int,
    trust_remote_code: bool = False,
    max_tokens: int | None = None,
    *,
    open_store: StoreOpener = aws_env_store,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Dataset:
    """Everything the data phase will write, read and checked first: run it before anything is written.
    ``open_store`` opens a bucket a source lives in (with storage.aws_credentials_block where one is set);
    ``tokenizer``: the base model's, where the caller has it already (:func:`base_tokenizer`)."""
    if config.gold_reward is not None:
        load_gold_scorer(config.gold_reward)
    if config.reward_model is not None:
        model_tokenizer(config.reward_model, "data.reward_model", trust_remote_code)
    tokenizer = tokenizer or base_tokenizer(config, trust_remote_code)
    dataset = read_user_data(config, tokenizer, max_tokens, open_store)
    if config.prompts is None:
        generated = world.make_world(seed, config.world)
        dataset.demonstrations = generated.demonstrations
        splits = (generated.sft_prompts, generated.preference_prompts, generated.ppo_prompts, generated.eval_prompts)
        dataset.prompts = dict(zip(SPLITS, splits, strict=True))
    if config.gold_reward is not None:
        try_judge(config.gold_reward, dataset, seed)
    return dataset
