"""Your own prompts, demonstrations, human preferences and gold judge: every row is checked before anything is
written, each problem is named by file, row and column, and the real pipeline runs on good files."""

import json
import random
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_flow import RLHF, rlhf_run, summary

from flows.config import ConfigError, load_config
from infra.artifacts import read_prompts
from infra.datasets import DatasetError
from infra.sources import inputs_digest
from infra.user_data import check_data
from rlhf_core import world
from rlhf_core.judge import JudgeError
from tasks.data import write_data

MAX_TOKENS = 48  # sft.max_length = reward.max_length at the defaults


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def user_rows(seed: int = 0) -> dict[str, list[dict]]:
    """Prompts (with splits), demonstrations and human preferences written in the toy vocabulary."""
    rng = random.Random(seed)
    prompts = world.all_prompts()
    rng.shuffle(prompts)
    splits = ["preference"] * 12 + ["ppo"] * 12 + ["eval"] * 12
    return {
        "prompts": [{"prompt": p, "split": s} for p, s in zip(prompts[:36], splits, strict=True)],
        "demonstrations": [
            {"prompt": p, "response": world.demonstration(p, rng.random(), rng)} for p in prompts[40:340]
        ],
        "human_preferences": [
            {"prompt": p, "chosen": world.demonstration(p, 1.0, rng), "rejected": world.demonstration(p, 0.0, rng)}
            for p in prompts[40:100]
        ],
    }


@pytest.fixture
def user_files(tmp_path) -> dict[str, str]:
    rows = user_rows()
    pq.write_table(pa.Table.from_pylist(rows["demonstrations"]), tmp_path / "demos.parquet")
    return {
        "prompts": write_jsonl(tmp_path / "prompts.jsonl", rows["prompts"]),
        "demonstrations": str(tmp_path / "demos.parquet"),
        "human_preferences": write_jsonl(tmp_path / "prefs.jsonl", rows["human_preferences"]),
    }


def user_config(files: dict[str, str], **changes: str):
    overrides = [f"data.{k}={v}" for k, v in {**files, "gold_reward": "user_judge:judge", **changes}.items()]
    return load_config(None, overrides).data


def test_good_user_files_become_the_data_artifact(user_files, tmp_path):
    config = user_config(user_files)
    metrics = write_data(tmp_path / "data", 0, config, max_tokens=MAX_TOKENS)
    assert metrics == {"demonstrations": 300, "eval_prompts": 12, "human_preferences": 60}
    rows = user_rows()
    assert read_prompts(tmp_path / "data", "ppo") == [r["prompt"] for r in rows["prompts"] if r["split"] == "ppo"]
    prefs = pq.read_table(tmp_path / "data" / "preferences.parquet").to_pylist()
    assert {p["labeler"] for p in prefs} == {"human"}
    assert sum(p["chosen_gold"] > p["rejected_gold"] for p in prefs) > 40  # judged by the user's judge


def test_prompts_without_a_split_column_split_by_their_text(user_files, tmp_path):
    rows = [{"prompt": r["prompt"]} for r in user_rows()["prompts"]] + [{"prompt": p} for p in world.all_prompts()]
    config = user_config({**user_files, "prompts": write_jsonl(tmp_path / "p.jsonl", rows)})
    first = check_data(config, 0, max_tokens=MAX_TOKENS).prompts
    again = check_data(config, 1, max_tokens=MAX_TOKENS).prompts
    assert first == again and all(first[s] for s in ("preference", "ppo", "eval"))
    assert 0.1 < len(first["eval"]) / len(rows) < 0.3


def test_editing_a_user_file_changes_the_data_digest(user_files):
    before = inputs_digest(user_config(user_files))
    assert before == inputs_digest(user_config(user_files))
    with open(user_files["prompts"], "a") as f:
        f.write(json.dumps({"prompt": "describe ocean :", "split": "eval"}) + "\n")
    assert inputs_digest(user_config(user_files)) != before


def _parquet(rows: list[dict], schema: pa.Schema | None = None):
    def write(path: Path) -> None:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)

    return write


def _text(content: bytes):
    return lambda path: path.write_bytes(content)


GOOD_PROMPT = "describe ocean :"
LONG = " ".join(["water"] * 60)
TEXT_SCHEMA = pa.schema([("prompt", pa.string()), ("response", pa.string())])
BAD_DATASETS = [
    # (field, file name, writer, expected message)
    ("prompts", "p.jsonl", _text(b""), r"p\.jsonl: the file is empty"),
    ("prompts", "p.jsonl", _text(b"\n\n"), r"p\.jsonl: no rows"),
    ("prompts", "p.txt", _text(b"prompt\nx\n"), r"p\.txt: unsupported file type '\.txt'"),
    (
        "prompts",
        "p.jsonl",
        _text(b'{"prompt": "describe ocean :"}\n{"prompt": "describe \xff"}\n'),
        r"row 2: not UTF-8",
    ),
    ("prompts", "p.jsonl", _text(b'{"prompt": "describe ocean :"}\n{"prompt": \n'), r"p\.jsonl: row 2: not a JSON obj"),
    ("prompts", "p.jsonl", _text(b'{"text": "describe ocean :"}\n'), r"row 1: missing column\(s\) \['prompt'\]"),
    ("prompts", "p.jsonl", _text(b'{"prompt": 7}\n'), r"row 1, column 'prompt': expected text, got int"),
    ("prompts", "p.jsonl", _text(b'{"prompt": null}\n'), r"row 1, column 'prompt': missing value"),
    ("prompts", "p.jsonl", _text(b'{"prompt": "   "}\n'), r"row 1, column 'prompt': empty or whitespace-only"),
    ("prompts", "p.jsonl", _text(b'["describe ocean :"]\n'), r"row 1: expected an object with columns, got list"),
    ("prompts", "p.jsonl", _text(b'{"prompt": "describe ocean :", "split": "test"}\n'), r"column 'split': 'test' is"),
    ("prompts", "p.jsonl", _text(b'{"prompt": "describe ocean :", "split": "ppo"}\n'), r"no 'preference' prompts"),
    ("prompts", "p.jsonl", _text(b'{"prompt": "describe the kraken :"}\n'), r"column 'prompt': words the tokenizer"),
    (
        "prompts",
        "p.jsonl",
        _text(json.dumps({"prompt": LONG}).encode()),
        r"row 1, column 'prompt': \d+ tokens \(in the model's chat format\) leave no room for a response in the 48 "
        r"that training keeps \(sft.max_length / reward.max_length\)",
    ),
    ("prompts", "missing.jsonl", None, r"missing\.jsonl: no such file"),
    ("demonstrations", "d.parquet", _text(b"not parquet"), r"d\.parquet: not a readable Parquet file"),
    ("demonstrations", "d.parquet", _parquet([], TEXT_SCHEMA), r"d\.parquet: no rows"),
    ("demonstrations", "d.parquet", _parquet([{"prompt": GOOD_PROMPT}]), r"row 1: missing column\(s\) \['response'\]"),
    (
        "demonstrations",
        "d.parquet",
        _parquet([{"prompt": GOOD_PROMPT, "response": "water"}, {"prompt": GOOD_PROMPT, "response": None}]),
        r"d\.parquet: row 2, column 'response': missing value \(null or NaN\)",
    ),
    (
        "demonstrations",
        "d.parquet",
        _parquet([{"prompt": GOOD_PROMPT, "response": float("nan")}]),
        r"d\.parquet: row 1, column 'response': missing value \(null or NaN\)",
    ),
    (
        "demonstrations",
        "d.parquet",
        _parquet([{"prompt": GOOD_PROMPT, "response": 3.5}]),
        r"row 1, column 'response': expected text, got float",
    ),
    (
        "demonstrations",
        "d.parquet",
        _parquet([{"prompt": GOOD_PROMPT, "response": LONG}]),
        r"row 1, column 'response': prompt \+ response is 65 tokens, more than the 48",
    ),
    (
        "human_preferences",
        "h.jsonl",
        _text(json.dumps({"prompt": GOOD_PROMPT, "chosen": "water waves", "rejected": " water waves"}).encode()),
        r"h\.jsonl: row 1, column 'rejected': identical to 'chosen'",
    ),
    (
        "human_preferences",
        "h.jsonl",
        _text(json.dumps({"prompt": GOOD_PROMPT, "chosen": "water", "rejected": ""}).encode()),
        r"row 1, column 'rejected': empty or whitespace-only",
    ),
]


@pytest.mark.parametrize(("field", "name", "write", "message"), BAD_DATASETS)
def test_a_bad_dataset_is_named_by_file_row_and_column(user_files, tmp_path, field, name, write, message):
    path = tmp_path / "bad" / name
    path.parent.mkdir()
    if write is not None:
        write(path)
    config = user_config({**user_files, field: str(path)})
    with pytest.raises(DatasetError, match=message):
        write_data(tmp_path / "out", 0, config, max_tokens=MAX_TOKENS)
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_a_judge_that_returns_nan_is_refused(user_files, tmp_path):
    config = user_config(user_files, gold_reward="user_judge:broken")
    with pytest.raises(
        DatasetError, match=r"prefs\.jsonl, column 'chosen': data.gold_reward='user_judge:broken' returned nan for "
    ):
        check_data(config, 0, max_tokens=MAX_TOKENS)


BROKEN_JUDGES = [  # without a human-preferences file, which used to be the only place a judge was tried
    ("one_short", r"returned 16 scores for 17 responses: it must return one each"),
    ("nan_for_empty", r"returned nan for response 16 \('' to the prompt '.*'\): a score must be a finite number"),
]


@pytest.mark.parametrize(("judge", "message"), BROKEN_JUDGES)
def test_a_broken_judge_is_tried_on_the_runs_own_data_and_refused_before_the_run(user_files, judge, message):
    files = {k: v for k, v in user_files.items() if k != "human_preferences"}
    tried = r" \(tried before the run on 17 of the run's own prompts and responses\)"
    with pytest.raises(JudgeError, match=rf"^data.gold_reward='user_judge:{judge}' {message}{tried}$"):
        check_data(user_config(files, gold_reward=f"user_judge:{judge}"), 0, max_tokens=MAX_TOKENS)
    check_data(user_config(files), 0, max_tokens=MAX_TOKENS)  # the good judge passes the same trial


BAD_CONFIGS = [
    (["data.prompts=p.jsonl"], r"data.demonstrations is required too"),
    (["data.demonstrations=d.jsonl"], r"data.prompts is required too"),
    (["data.prompts=p.jsonl", "data.demonstrations=d.jsonl"], r"data.gold_reward is required with data.prompts"),
    (["data.gold_reward=user_judge.judge"], r"data.gold_reward: Value error, expected 'package.module:function'"),
    (["data.prompt=p.jsonl"], r"data.prompt: Extra inputs are not permitted"),
    (["data.human_preferences=7"], r"data.human_preferences: Input should be a valid string"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_CONFIGS)
def test_a_bad_data_config_names_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


TOO_LONG = [  # the toy world: a context of 64 positions, prompts of up to 11 tokens, 32 new tokens, max_length 48
    (
        ["ppo.max_new_tokens=100000"],
        r"ppo.max_new_tokens=100000: the longest prompt \(11 tokens\) and 100000 new "
        r"tokens take 100011 positions, past the policy's context of 64 \(data.world.max_position_embeddings\)",
    ),
    (["evaluation.max_new_tokens=60"], r"evaluation.max_new_tokens=60: .* past the policy's context of 64"),
    (["sft.max_length=65"], r"sft.max_length=65: past the model's context of 64 positions"),
    (
        ["reward.max_length=40"],
        r"reward.max_length=40: responses of preferences.max_new_tokens=32 .* take 44 tokens "
        r"with their EOS .*: raise reward.max_length to 44 or lower preferences.max_new_tokens",
    ),
    (["algorithm=dpo", "dpo.max_length=43"], r"dpo.max_length=43: responses of preferences.max_new_tokens=32"),
]


@pytest.mark.parametrize(("overrides", "message"), TOO_LONG)
def test_token_budgets_past_the_models_name_the_field_before_anything_is_written(overrides, message, tmp_path):
    from flows.pipeline import check_inputs

    config = load_config(None, [*overrides, f"storage.uri={tmp_path / 'store'}"])
    with pytest.raises(ValueError, match=message):
        check_inputs(config)
    assert not (tmp_path / "store").exists()


def test_token_budgets_are_read_from_a_base_models_config(base_dir):
    from flows.limits import check_lengths
    from rlhf_core.modeling import load_tokenizer

    config = load_config(None, [f"data.base_model={base_dir}", "ppo.max_new_tokens=60"])
    with pytest.raises(ValueError, match=rf"ppo.max_new_tokens=60: .* \(max_position_embeddings of '{base_dir}'\)"):
        check_lengths(config, ["explain briefly ocean :"], load_tokenizer(base_dir))
    check_lengths(
        config.model_copy(update={"ppo": config.ppo.model_copy(update={"max_new_tokens": 32})}),
        ["explain briefly ocean :"],
        load_tokenizer(base_dir),
    )  # fits: no error
    check_lengths(
        load_config(None, ["algorithm=dpo", "evaluation.max_new_tokens=40"]),
        ["explain briefly ocean :"],
        load_tokenizer(base_dir),
    )  # DPO never reads the evaluation's samples


def test_an_unimportable_judge_names_the_field(user_files):
    with pytest.raises(
        ValueError,
        match=r"data.gold_reward='no_such_module:judge': cannot import .*put the folder that holds "
        r"'no_such_module' on PYTHONPATH",
    ):
        check_data(user_config(user_files, gold_reward="no_such_module:judge"), 0)


def test_a_hub_model_id_that_cannot_be_had_fails_at_once_with_advice():
    """No local folder, and no hub to fetch it from (this machine has none; elsewhere, no such model): refused by
    the first check rather than after a minute of the hub client's retries."""
    from infra.user_data import base_tokenizer

    config = load_config(None, ["data.base_model=no-such-org-rlhf-test/no-such-model"]).data
    with pytest.raises(
        ValueError,
        match=r"^data.base_model='no-such-org-rlhf-test/no-such-model': no such local "
        r"folder, and the Hugging Face Hub cannot provide it from here .* download it elsewhere",
    ):
        base_tokenizer(config)


@pytest.mark.slow
def test_the_cli_refuses_a_broken_judge_before_writing_and_names_one_that_breaks_mid_run(
    user_files, pipeline_env, tmp_path
):
    env = pipeline_env | {"PYTHONPATH": str(Path(__file__).parent)}
    files = [f"data.{k}={v}" for k, v in user_files.items() if k != "human_preferences"]
    proc = rlhf_run(env, tmp_path, *files, "data.gold_reward=user_judge:one_short", "iterations=1", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data.gold_reward='user_judge:one_short' returned 16 scores for 17" in proc.stderr.replace("\n", "")
    assert not (tmp_path / "rlhf-artifacts").exists() and not (tmp_path / "rlhf-mlflow").exists()

    # passes the trial, then returns one score short on a run's larger batches: the phase fails, naming the judge
    proc = rlhf_run(env, tmp_path, *files, "data.gold_reward=user_judge:short_on_big_batches", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    said = proc.stderr.replace("\n", "")
    assert "error: data.gold_reward='user_judge:short_on_big_batches' returned " in said, said[-3000:]
    assert "Traceback" not in proc.stderr and "zip()" not in proc.stderr


def test_the_cli_refuses_a_bad_file_before_writing_anything(user_files, pipeline_env, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": GOOD_PROMPT, "response": "water"}, {"prompt": GOOD_PROMPT}])
    env = pipeline_env | {"PYTHONPATH": str(Path(__file__).parent)}
    files = {**user_files, "demonstrations": bad, "gold_reward": "user_judge:judge"}
    args = [RLHF, "run", *[a for k, v in files.items() for a in ("--set", f"data.{k}={v}")]]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "bad.jsonl: row 2: missing column(s) ['response']" in proc.stderr.replace("\n", "")
    assert not (tmp_path / "rlhf-artifacts").exists() and not (tmp_path / "rlhf-mlflow").exists()


@pytest.mark.slow
def test_the_pipeline_runs_on_user_files_and_judge(user_files, pipeline_env, tmp_path):
    env = pipeline_env | {"PYTHONPATH": str(Path(__file__).parent)}
    files = [f"data.{k}={v}" for k, v in user_files.items()]
    rlhf_run(env, tmp_path, *files, "data.gold_reward=user_judge:judge", "iterations=1")
    result = summary(tmp_path)
    assert [it["iteration"] for it in result["iterations"]] == [1]
    root = Path(result["artifacts_uri"])
    manifests = {p.parent.relative_to(root).as_posix(): json.loads(p.read_text()) for p in root.rglob("MANIFEST.json")}
    data = next(m for k, m in manifests.items() if k.startswith("data/world"))
    assert data["metadata"]["parents"] == user_files  # where each dataset was read, in the data artifact's manifest
    from mlflow.tracking import MlflowClient

    parent = MlflowClient(result["mlflow_tracking_uri"]).get_run(result["mlflow_run_id"])
    sources = {i.dataset.name: json.loads(i.dataset.source)["uri"] for i in parent.inputs.dataset_inputs}
    assert sources["human-preferences"] == user_files["human_preferences"]
    reward = next(m for k, m in manifests.items() if k.startswith("iteration-001/reward_model"))
    preferences = reward["metadata"]["parents"]["preferences"]
    assert len(preferences) == 2 and "data/world" in preferences[0]  # the human pairs, then the collected ones
    evaluation = next(root / k for k in manifests if k.startswith("iteration-001/evaluation"))
    metrics = json.loads((evaluation / "metrics.json").read_text())
    # the user's judge scored the samples: it counts on-topic words and rude words only, so scores are integers
    samples = pq.read_table(evaluation / "samples.parquet").to_pylist()
    assert samples and all(float(s["policy_gold"]).is_integer() for s in samples)
    assert metrics["sft_gold_reward"] == result["sft"]["gold_reward"]
