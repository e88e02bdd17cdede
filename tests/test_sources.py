"""Data from where users keep it (infra/sources.py): a dataset folder in hub layout and one from save_to_disk, an object
in a bucket (moto's S3 server), and the formats the ecosystem uses, mapped to our columns with errors that name the
source, row and column. No machine here reaches the hub: a hub id fails before anything is written, saying so."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import user_judge
from test_user_data import MAX_TOKENS, user_config, user_rows, write_jsonl

from infra.artifacts import data_judge, read_prompts
from infra.datasets import DatasetError
from infra.sources import chat_renderer, inputs_digest, resolve, to_columns
from infra.user_data import check_data
from rlhf_core import world
from rlhf_core.modeling import load_tokenizer, prompt_token_ids
from tasks.data import write_data

README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test-*.parquet
---
# A preference dataset in the hub's layout
"""


def hub_layout(folder: Path, train: list[dict], test: list[dict] | None = None) -> str:
    """A folder as a hub dataset repository has it (a README card, data/<split>-*.parquet): what git clone gives."""
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(train), folder / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(test or train[:5]), folder / "data" / "test-00000-of-00001.parquet")
    (folder / "README.md").write_text(README)
    return str(folder)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    rows = user_rows()
    return {
        "prompts": write_jsonl(tmp_path / "prompts.jsonl", rows["prompts"]),
        "demonstrations": write_jsonl(tmp_path / "demos.jsonl", rows["demonstrations"]),
    }


@pytest.fixture(autouse=True)
def offline_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def test_a_folder_in_hub_layout_is_read_like_a_hub_dataset(files: dict[str, str], tmp_path: Path) -> None:
    preferences = user_rows()["human_preferences"]
    folder = hub_layout(tmp_path / "hub-clone", preferences, preferences[:7])
    config = user_config({**files, "human_preferences": folder})
    assert [p["chosen"] for p in check_data(config, 0, max_tokens=MAX_TOKENS).preferences] == [
        r["chosen"] for r in preferences
    ]  # the train split by default
    test_split = user_config({**files, "human_preferences": f"{folder}:test"})
    assert len(check_data(test_split, 0, max_tokens=MAX_TOKENS).preferences) == 7
    missing = user_config({**files, "human_preferences": f"{folder}:validation"})
    with pytest.raises(
        DatasetError, match=rf"no split 'validation'; it has \['train', 'test'\]: name one as {folder}:SPL"
    ):
        check_data(missing, 0, max_tokens=MAX_TOKENS)

    # the folder's content is in the cache key, and where it was read is recorded with the data artifact
    before = inputs_digest(config)
    pq.write_table(pa.Table.from_pylist(preferences[:20]), Path(folder) / "data" / "train-00000-of-00001.parquet")
    assert inputs_digest(config) != before
    write_data(tmp_path / "artifact", 0, config, max_tokens=MAX_TOKENS)
    assert json.loads((tmp_path / "artifact" / "sources.json").read_text()) == {
        "prompts": files["prompts"],
        "demonstrations": files["demonstrations"],
        "human_preferences": folder,
    }


def test_a_save_to_disk_folder_with_conversations_and_a_chat_template(
    files: dict[str, str], tmp_path: Path, base_dir: Path
) -> None:
    from datasets import Dataset, DatasetDict

    # a base model whose tokenizer has a chat template (in the toy vocabulary: BOS, then the turns' words)
    model = tmp_path / "chat-model"
    shutil.copytree(base_dir, model)
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config | {"chat_template": template}))

    rng = random.Random(0)
    prompts = world.all_prompts()[40:100]
    rude_reply = " ".join(sorted(world.RUDE)[:2])
    demonstrations = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": world.demonstration(p, 1, rng)}]}
        for p in prompts
    ]
    preferences = [  # UltraFeedback's binarized layout: a text prompt, answers that repeat it as the first turn
        {
            "prompt": p,
            "chosen": [
                {"role": "user", "content": p},
                {"role": "assistant", "content": world.demonstration(p, 1, rng)},
            ],
            "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": rude_reply}],
        }
        for p in prompts
    ]
    DatasetDict({"train": Dataset.from_list(demonstrations)}).save_to_disk(tmp_path / "demos-disk")
    Dataset.from_list(preferences).save_to_disk(tmp_path / "prefs-disk")
    config = user_config(
        {**files, "demonstrations": str(tmp_path / "demos-disk"), "human_preferences": str(tmp_path / "prefs-disk")},
        base_model=str(model),
    )
    dataset = check_data(config, 0, max_tokens=MAX_TOKENS)
    assert dataset.demonstrations[0] == (f"<bos>{prompts[0]} ", demonstrations[0]["messages"][1]["content"])
    assert dataset.preferences[0]["prompt"] == f"<bos>{prompts[0]} "
    assert dataset.preferences[0]["rejected"] == rude_reply
    # text prompts too, as one user turn; and the template's BOS is not doubled when every phase tokenizes them
    assert all(p.startswith("<bos>") and p.endswith(" ") for split in dataset.prompts.values() for p in split)
    tokenizer = load_tokenizer(model)
    ids = prompt_token_ids(tokenizer, dataset.preferences[0]["prompt"])
    assert ids.count(tokenizer.bos_token_id) == 1 and ids == prompt_token_ids(tokenizer, prompts[0])
    plain = check_data(config.model_copy(update={"chat_template": False}), 0, max_tokens=MAX_TOKENS)
    assert plain.demonstrations[0][0] == prompts[0]
    assert not any(p.startswith("<bos>") for split in plain.prompts.values() for p in split)


def test_the_judge_reads_each_prompt_as_the_user_wrote_it(
    files: dict[str, str], tmp_path: Path, base_dir: Path
) -> None:
    """The model sees every prompt through its chat template; the gold judge gets the user's text, in the checks
    before the run, on the human pairs, and from the data artifact every later phase judges with."""
    model = tmp_path / "chat-model"
    shutil.copytree(base_dir, model)
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config | {"chat_template": template}))
    preferences = write_jsonl(tmp_path / "prefs.jsonl", user_rows()["human_preferences"])
    config = user_config(
        {**files, "human_preferences": preferences}, base_model=str(model), gold_reward="user_judge:as_written_only"
    )
    write_data(tmp_path / "artifact", 0, config, max_tokens=MAX_TOKENS)  # the judge refuses a rendered prompt
    prompts = read_prompts(tmp_path / "artifact", "eval")
    assert all(p.startswith("<bos>") for p in prompts)
    responses = [world.demonstration(p.removeprefix("<bos>").strip(), 1, random.Random(0)) for p in prompts]
    expected = user_judge.judge([p.removeprefix("<bos>").strip() for p in prompts], responses)
    assert data_judge(tmp_path / "artifact")(prompts, responses) == expected
    # without a template the prompts are the user's text already, and no second copy is kept
    write_data(tmp_path / "plain", 0, config.model_copy(update={"chat_template": False}), max_tokens=MAX_TOKENS)
    assert "prompt_as_written" not in pq.read_table(tmp_path / "plain" / "prompts.parquet").column_names


def test_an_object_in_a_bucket_is_read_through_the_store(files: dict[str, str], s3_bucket: str) -> None:
    preferences = user_rows()["human_preferences"]
    s3 = boto3.client("s3")
    body = "".join(json.dumps(r) + "\n" for r in preferences).encode()
    s3.put_object(Bucket=s3_bucket, Key="data/prefs.jsonl", Body=body)
    config = user_config({**files, "human_preferences": f"s3://{s3_bucket}/data/prefs.jsonl"})
    assert len(check_data(config, 0, max_tokens=MAX_TOKENS).preferences) == len(preferences)
    identity = resolve("data.human_preferences", config.human_preferences, _env_store).identity
    assert identity.startswith("s3:etag:") and f"size:{len(body)}" in identity
    before = inputs_digest(config)
    s3.put_object(Bucket=s3_bucket, Key="data/prefs.jsonl", Body=body[: body.rindex(b"{")])  # one row fewer
    assert inputs_digest(config) != before

    bad = [*preferences[:3], {"prompt": "describe ocean :", "chosen": "water"}]
    s3.put_object(Bucket=s3_bucket, Key="data/bad.jsonl", Body="".join(json.dumps(r) + "\n" for r in bad).encode())
    config = user_config({**files, "human_preferences": f"s3://{s3_bucket}/data/bad.jsonl"})
    with pytest.raises(DatasetError, match=rf"s3://{s3_bucket}/data/bad\.jsonl: row 4: missing column\(s\) \['rej"):
        check_data(config, 0, max_tokens=MAX_TOKENS)
    config = user_config({**files, "human_preferences": f"s3://{s3_bucket}/data/none.jsonl"})
    with pytest.raises(DatasetError, match=rf"data.human_preferences='s3://{s3_bucket}/data/none.jsonl': no object"):
        check_data(config, 0, max_tokens=MAX_TOKENS)


def _env_store(uri: str):
    from infra.storage import open_store

    return open_store(uri)


def test_a_hub_id_without_hub_access_fails_before_anything_is_written(files: dict[str, str], tmp_path: Path) -> None:
    config = user_config({**files, "human_preferences": "hf://Anthropic/hh-rlhf@main:train"})
    with pytest.raises(DatasetError, match=r"data.human_preferences=hf://Anthropic/hh-rlhf: cannot reach the Hugging"):
        write_data(tmp_path / "out", 0, config, max_tokens=MAX_TOKENS)
    assert not (tmp_path / "out").exists()
    with pytest.raises(DatasetError, match=r"expected hf://OWNER/NAME\[@REVISION\]\[:SPLIT\]"):
        resolve("data.prompts", "hf://just-a-name", _env_store)


class _NoTemplate:
    chat_template = None


RENDER = chat_renderer(_NoTemplate())


@pytest.mark.parametrize(
    ("name", "row", "columns", "expected"),
    [
        # TRL's standard preference format
        ("human_preferences", {"prompt": "q", "chosen": "a", "rejected": "b"}, {}, ("q", "a", "b")),
        # HH-RLHF: whole conversations, the prompt their shared start up to the last assistant marker
        (
            "human_preferences",
            {
                "chosen": "\n\nHuman: Hi?\n\nAssistant: I think so.",
                "rejected": "\n\nHuman: Hi?\n\nAssistant: I think not.",
            },
            {},
            ("\n\nHuman: Hi?\n\nAssistant:", "I think so.", "I think not."),
        ),
        # whole conversations without markers: the shared start, cut at a word boundary
        (
            "human_preferences",
            {"chosen": "tell me a joke please", "rejected": "tell me a story"},
            {},
            ("tell me a", "joke please", "story"),
        ),
        # conversational pairs without a prompt: the shared turns are the prompt
        (
            "human_preferences",
            {
                "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
            },
            {},
            ("q", "a", "b"),
        ),
        # a column mapping for anything else
        (
            "human_preferences",
            {"question": "q", "good": "a", "bad": "b"},
            {"prompt": "question", "chosen": "good", "rejected": "bad"},
            ("q", "a", "b"),
        ),
        ("demonstrations", {"prompt": "q", "completion": "a"}, {}, ("q", "a")),
        ("demonstrations", {"question": "q", "answer": "a"}, {"prompt": "question", "response": "answer"}, ("q", "a")),
        (
            "demonstrations",
            {
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            {},
            ("s\n\nq", "a"),
        ),
        ("prompts", {"messages": [{"role": "user", "content": "q"}]}, {}, ("q",)),
    ],
)
def test_the_ecosystems_formats_map_to_our_columns(name, row, columns, expected) -> None:
    mapped = to_columns([row], name=name, label="src", columns=columns, render=RENDER)[0]
    keys = {
        "prompts": ("prompt",),
        "demonstrations": ("prompt", "response"),
        "human_preferences": ("prompt", "chosen", "rejected"),
    }[name]
    assert tuple(mapped[k] for k in keys) == expected


def test_a_row_in_no_known_format_is_named() -> None:
    with pytest.raises(DatasetError, match=r"src: row 2: .*'messages' must end with an assistant turn.*data.columns"):
        to_columns(
            [
                {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                {"messages": [{"role": "user", "content": "q"}]},
            ],
            name="demonstrations",
            label="src",
            columns={},
            render=RENDER,
        )
    with pytest.raises(DatasetError, match=r"src: row 1: no 'prompt' column, and 'chosen' and 'rejected' share no"):
        to_columns([{"chosen": "a", "rejected": "b"}], name="human_preferences", label="src", columns={}, render=RENDER)
