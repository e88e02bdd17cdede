"""Where the user's datasets come in, and in what shape.

A data field (``data.prompts``, ``data.demonstrations``, ``data.human_preferences``) names one of:

- a local file: ``.parquet``, ``.jsonl`` or ``.csv``;
- a Hugging Face Hub dataset: ``hf://OWNER/NAME[@REVISION][:SPLIT]``, pinned to the commit the revision resolves to;
- a local dataset folder: what ``Dataset.save_to_disk`` writes, or a hub dataset's layout (``data/*.parquet`` and a
  README card, e.g. a ``git clone`` of a hub repository), with an optional ``:SPLIT``;
- an object in a bucket: ``s3://BUCKET/KEY.parquet`` (or ``.jsonl``, ``.csv``), read through the project's store and
  its credentials (``storage.aws_credentials_block`` or the AWS environment).

Rows then come in the formats the ecosystem uses and leave as our flat text columns (:func:`to_columns`). The pipeline
keeps its own Parquet tables after this point: ``datasets`` is used only to read what comes in.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.artifacts import AS_WRITTEN
from infra.datasets import TABLE_LOADERS, DatasetError, read_table
from infra.storage import ObjectStore, StorageError, file_digest, folder_digest, open_store
from rlhf_core.data import DataConfig, load_gold_scorer

HUB = "hf://"
_HUB_SPEC = re.compile(r"hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^:]+))?(?::(?P<split>[\w.-]+))?")
BATCH_ROWS = 10_000  # rows converted to Python at a time from a dataset's Arrow table
StoreOpener = Callable[[str], ObjectStore]  # "s3://bucket" -> a store with the configured credentials


@dataclass(frozen=True)
class Source:
    """One data field's source, resolved: what errors name, and what identifies its content for the cache key."""

    field: str  # "data.prompts"
    spec: str  # as the user wrote it
    kind: str  # "file", "hub", "folder" or "store"
    label: str  # the spec, with a hub dataset's revision resolved to its commit
    identity: str  # content digest, pinned commit, or ETag and size


def _hub_commit(field: str, repo: str, revision: str | None) -> str:
    """The commit a hub dataset's revision points to now; DatasetError where the hub cannot be reached."""
    from huggingface_hub import HfApi

    try:
        return str(HfApi().dataset_info(repo, revision=revision).sha)
    except Exception as e:  # offline mode, no route, DNS, 401/404: all mean "cannot use it from here"
        raise DatasetError(
            f"{field}=hf://{repo}: cannot reach the Hugging Face Hub to resolve its revision "
            f"({type(e).__name__}: {str(e)[:200]}); on a machine without hub access, download it elsewhere "
            f"(Dataset.save_to_disk or git clone) and give {field} that folder"
        ) from e


def _folder_and_split(spec: str) -> tuple[Path, str | None] | None:
    """``folder`` or ``folder:split`` when that folder exists."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path, None
    head, _, split = spec.rpartition(":")
    if head and Path(head).expanduser().is_dir() and re.fullmatch(r"[\w.-]+", split):
        return Path(head).expanduser(), split
    return None


def resolve(field: str, spec: str, open_store: StoreOpener) -> Source:
    """What ``spec`` names and its content's identity (a hub revision is resolved to a commit here, so an offline
    machine fails before anything is written)."""
    if spec.startswith(HUB):
        match = _HUB_SPEC.fullmatch(spec)
        if match is None:
            raise DatasetError(f"{field}={spec!r}: expected hf://OWNER/NAME[@REVISION][:SPLIT]")
        commit = _hub_commit(field, match["repo"], match["revision"])
        label = f"{HUB}{match['repo']}@{commit}" + (f":{match['split']}" if match["split"] else "")
        return Source(field, spec, "hub", label, f"hub:{label}")
    if spec.startswith("s3://"):
        bucket, _, key = spec.removeprefix("s3://").partition("/")
        if not key or Path(key).suffix not in TABLE_LOADERS:
            raise DatasetError(f"{field}={spec!r}: expected s3://BUCKET/KEY ending in {' or '.join(TABLE_LOADERS)}")
        try:
            fingerprint = open_store(f"s3://{bucket}").fingerprint(key)
        except StorageError as e:
            raise DatasetError(f"{field}={spec!r}: {e}") from e
        return Source(field, spec, "store", spec, f"s3:{fingerprint}")
    if (folder := _folder_and_split(spec)) is not None:
        return Source(field, spec, "folder", spec, f"folder:{folder_digest(folder[0])}:{folder[1] or ''}")
    path = Path(spec)
    identity = file_digest(path) if path.is_file() else "missing"
    return Source(field, spec, "file", spec, f"file:{identity}")


def _dataset_rows(dataset: Any) -> Iterator[dict[str, Any]]:
    """A ``datasets.Dataset``'s rows, converted from Arrow a batch at a time rather than all at once."""
    for batch in dataset.iter(batch_size=BATCH_ROWS):
        columns = list(batch)
        yield from (dict(zip(columns, values, strict=True)) for values in zip(*batch.values(), strict=True))


def _pick_split(source: Source, loaded: Any, split: str | None, base: str) -> Any:
    """A Dataset from what ``load_dataset``/``load_from_disk`` gave: the named split, else ``train``, else the only
    one. ``base``: the source without its split, for the message."""
    if not hasattr(loaded, "keys"):  # a single Dataset
        return loaded
    splits = list(loaded.keys())
    chosen = split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
    if chosen not in splits:
        raise DatasetError(
            f"{source.field}={source.spec!r}: "
            + (f"no split {split!r}" if split else "several splits and no 'train'")
            + f"; it has {splits}: name one as {base}:SPLIT"
        )
    return loaded[chosen]


def load_rows(source: Source, *, dataset_config: str | None = None, open_store: StoreOpener) -> list[dict[str, Any]]:
    """The source's rows as dicts (columns as the source has them); DatasetError names the source."""
    if source.kind in ("file", "store"):
        if source.kind == "file":
            return read_table(Path(source.spec), tuple(TABLE_LOADERS))
        bucket, _, key = source.spec.removeprefix("s3://").partition("/")
        with tempfile.TemporaryDirectory(prefix="rlhf-source-") as tmp:
            local = Path(tmp) / Path(key).name
            try:
                open_store(f"s3://{bucket}").get_file(key, local)
            except StorageError as e:
                raise DatasetError(f"{source.field}={source.spec!r}: {e}") from e
            return read_table(local, tuple(TABLE_LOADERS), name=source.spec)
    import datasets

    try:
        if source.kind == "hub":
            match = _HUB_SPEC.fullmatch(source.label)
            assert match is not None  # resolve() made it
            loaded = datasets.load_dataset(match["repo"], name=dataset_config, revision=match["revision"])
            dataset = _pick_split(
                source, loaded, match["split"], source.spec.rsplit(":", 1)[0] if match["split"] else source.spec
            )
        else:
            folder, split = _folder_and_split(source.spec) or (Path(source.spec), None)
            if (folder / "dataset_info.json").exists() or (folder / "dataset_dict.json").exists():
                loaded = datasets.load_from_disk(str(folder))  # what save_to_disk wrote
            else:  # a hub repository's layout, read the way a hub id is
                loaded = datasets.load_dataset(str(folder), name=dataset_config)
            dataset = _pick_split(source, loaded, split, str(folder))
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{source.field}={source.spec!r}: cannot load it as a dataset: {e}") from e
    rows = list(_dataset_rows(dataset))
    if not rows:
        raise DatasetError(f"{source.label}: no rows")
    return rows


# ---------------------------------------------------------------------------------------------------- formats

Messages = list[dict[str, str]]
RenderPrompt = Callable[[Messages], str]


def chat_renderer(tokenizer: Any, *, use_template: bool = True) -> RenderPrompt:
    """Messages as prompt text: the tokenizer's chat template with the generation prompt where it has one (and
    ``use_template``), else the turns' contents, one per paragraph (so one user turn is its text as it is)."""
    if use_template and getattr(tokenizer, "chat_template", None):
        return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return lambda messages: "\n\n".join(m["content"] for m in messages)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value) and bool(value)


def _reply(messages: Messages) -> str:
    return "\n\n".join(m["content"] for m in messages)


def _shared_prefix(chosen: str, rejected: str) -> int:
    """Where the implicit prompt of two whole conversations ends: after their last shared ``Assistant:`` marker (the
    HH-RLHF layout) where there is one, else at the last whitespace of their common prefix."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    marker = chosen.rfind("Assistant:", 0, n)
    if marker >= 0:
        end = marker + len("Assistant:")
        return end + len(chosen[end:n]) - len(chosen[end:n].lstrip())
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    return n


def _split_conversations(chosen: Messages, rejected: Messages, prompt: Messages | None) -> tuple[Messages, str, str]:
    """The prompt's turns and the two answers: the given prompt (its turns stripped where the answers repeat them),
    else the turns both conversations share."""
    if prompt is None:
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt = chosen[:n]
    n = len(prompt) if chosen[: len(prompt)] == prompt == rejected[: len(prompt)] else 0
    return prompt, _reply(chosen[n:]), _reply(rejected[n:])


def _preference(row: dict[str, Any], render: RenderPrompt) -> dict[str, Any]:
    if "chosen" not in row or "rejected" not in row:
        return row  # the column check names what is missing
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if _is_messages(chosen) and _is_messages(rejected):
        # a text prompt with conversational answers that repeat it as their first turn: UltraFeedback binarized
        as_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        messages, chosen_text, rejected_text = _split_conversations(chosen, rejected, as_messages)
        if not messages:
            raise ValueError("'chosen' and 'rejected' share no turns to take as the prompt")
        return _with_prompt({"chosen": chosen_text, "rejected": rejected_text}, messages, render)
    if "prompt" not in row and isinstance(chosen, str) and isinstance(rejected, str):
        cut = _shared_prefix(chosen, rejected)
        if cut == 0:
            raise ValueError("no 'prompt' column, and 'chosen' and 'rejected' share no prefix to take as the prompt")
        prompt = chosen[:cut].rstrip()
        return {"prompt": prompt, AS_WRITTEN: prompt, "chosen": chosen[cut:], "rejected": rejected[cut:]}
    return _with_prompt(row, prompt, render) if "prompt" in row else row


def _render_prompt(prompt: Any, render: RenderPrompt) -> Any:
    """A prompt in the model's chat format: its messages, or its text as one user turn, rendered."""
    if _is_messages(prompt):
        return render(prompt)
    return render([{"role": "user", "content": prompt}]) if isinstance(prompt, str) else prompt


def _as_written(prompt: Any) -> Any:
    """A prompt as the user wrote it, for the gold judge: its text, or its turns' contents one per paragraph."""
    return _reply(prompt) if _is_messages(prompt) else prompt


def _with_prompt(row: dict[str, Any], prompt: Any, render: RenderPrompt) -> dict[str, Any]:
    """``row`` with ``prompt`` rendered in the model's chat format, and as written (:data:`AS_WRITTEN`)."""
    return {**row, "prompt": _render_prompt(prompt, render), AS_WRITTEN: _as_written(prompt)}


def _demonstration(row: dict[str, Any], render: RenderPrompt) -> dict[str, Any]:
    if "prompt" not in row and _is_messages(row.get("messages")):
        messages = row["messages"]
        if messages[-1].get("role") != "assistant" or len(messages) < 2:
            raise ValueError("'messages' must end with an assistant turn after the prompt's turns")
        return _with_prompt({"response": messages[-1]["content"]}, messages[:-1], render)
    out = dict(row)
    if "response" not in out and "completion" in out:  # TRL's prompt-completion format
        out["response"] = out["completion"]
    if "prompt" in out:
        out = _with_prompt(out, out["prompt"], render)
    if _is_messages(out.get("response")):
        out["response"] = _reply(out["response"])
    return out


def _prompt(row: dict[str, Any], render: RenderPrompt) -> dict[str, Any]:
    if "prompt" not in row and "messages" in row and _is_messages(row["messages"]):
        messages = row["messages"]
        turns = messages[:-1] if messages[-1].get("role") == "assistant" else messages
        return _with_prompt(row, turns, render)
    if "prompt" in row:
        return _with_prompt(row, row["prompt"], render)
    return row


_SHAPES = {"prompts": _prompt, "demonstrations": _demonstration, "human_preferences": _preference}
_FORMATS = {
    "prompts": "'prompt' (text or messages), or 'messages'",
    "demonstrations": "'prompt' and 'response' (or TRL's 'completion'), or 'messages' ending with the answer",
    "human_preferences": "'prompt', 'chosen' and 'rejected'; 'chosen' and 'rejected' holding whole conversations "
    "(text, or lists of {role, content}) whose shared start is the prompt",
}


def to_columns(
    rows: list[dict[str, Any]], *, name: str, label: str, columns: dict[str, str], render: RenderPrompt
) -> list[dict[str, Any]]:
    """Rows of data field ``name`` in our columns: ``columns`` (ours -> theirs) renames first, then the ecosystem's
    formats are recognized. A row that fits none is named, with the columns it has and the formats accepted."""
    shape = _SHAPES[name]
    out = []
    for number, row in enumerate(rows, start=1):
        renamed = {**row, **{ours: row[theirs] for ours, theirs in columns.items() if theirs in row}}
        try:
            out.append(shape(renamed, render))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            problem = f"missing column {e}" if isinstance(e, KeyError) else str(e)
            raise DatasetError(
                f"{label}: row {number}: {problem}; it has columns {sorted(row)}. Accepted: {_FORMATS[name]}; "
                f"map other names with data.columns (e.g. data.columns: {{prompt: question}})"
            ) from e
    return out


def aws_env_store(uri: str):
    """A store with the AWS environment's credentials: how sources in a bucket are read when no Prefect block is
    configured."""
    return open_store(uri)


def inputs_digest(config: DataConfig, open_store: StoreOpener = aws_env_store) -> str | None:
    """Digest of what the data phase reads besides its config (base- and reward-model folders, the user's data by
    content digest, pinned hub commit or object ETag, the judge's source), so a change to any of them invalidates
    the cache (a hub dataset's moving branch only when its commit moved). None when there are none."""
    parts = [
        f"{name}={folder_digest(path) if path.is_dir() else file_digest(path)}"
        for name, model in (("base_model", config.base_model), ("reward_model", config.reward_model))
        if model is not None and (path := Path(model).expanduser()).exists()
    ]
    for name, spec in config.user_sources.items():
        parts.append(f"{name}={resolve(f'data.{name}', spec, open_store).identity}")
    if config.gold_reward is not None:
        try:
            source = inspect.getsource(inspect.getmodule(load_gold_scorer(config.gold_reward)))
        except (OSError, TypeError):  # no source to read: the name is all there is
            source = config.gold_reward
        parts.append(f"gold_reward={hashlib.sha256(source.encode()).hexdigest()}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest() if parts else None
