"""The instruction-following example: its prompt builder (examples/instruction-following/instructions.py) and its
gold judge (instruction_judge.py there), on hand-checked cases.

Why: the judge's scores become the labels, the reward and every win rate of a run on that example, so each rule it
applies is pinned here on responses whose verdict a person can check by eye.
"""

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("if_verifiable")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "instruction-following"


def _load(name: str) -> ModuleType:
    """The example's module ``name`` under a private name: the example folder is not a package."""
    spec = importlib.util.spec_from_file_location(f"instruction_following_{name}", EXAMPLE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


instructions = _load("instructions")
judge = _load("instruction_judge")

LOWER = "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed."
NO_COMMA = "In your entire response, refrain from the use of any commas."
SKY = f"Explain why the sky is blue. {LOWER} {NO_COMMA}"
END = "Finish your response with this exact phrase Hope this helps!. No other words should follow this phrase."
TEA_END = f"Describe how to make a cup of tea. {END}"
JSON_FORMAT = "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```."
JSON = f"Explain how bread rises. {JSON_FORMAT}"
QUOTES = "Summarize a quote. Every quoted phrase must be followed by an unquoted explanation."
BOGUS = "Do something no checker knows."

TABLE = [
    {
        "prompt": SKY,
        "family": "ifeval",
        "split": "eval",
        "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma"],
        "kwargs": [{}, {}],
    },
    {
        "prompt": TEA_END,
        "family": "ifeval",
        "split": "ppo",
        "instruction_id_list": ["startend:end_checker"],
        "kwargs": [{"end_phrase": "Hope this helps!"}],
    },
    {
        "prompt": JSON,
        "family": "ifeval",
        "split": "ppo",
        "instruction_id_list": ["detectable_format:json_format"],
        "kwargs": [{}],
    },
    {
        "prompt": QUOTES,
        "family": "ifbench",
        "split": "eval",
        "instruction_id_list": ["format:quote_unquote"],
        "kwargs": [{}],
    },
    {"prompt": BOGUS, "family": "ifeval", "split": "eval", "instruction_id_list": ["bogus:id"], "kwargs": [{}]},
]


def _write(folder: Path, rows: list[dict]) -> None:
    (folder / "constraints.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The hand-written constraint table above, where $RLHF_IF_DATA points, with the judge's cache fresh."""
    _write(tmp_path, TABLE)
    monkeypatch.setenv("RLHF_IF_DATA", str(tmp_path))
    judge.clear_cache()
    yield tmp_path
    judge.clear_cache()


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return instructions.build_prompts(0)


# ---------------------------------------------------------------------------------------------------------------
# The prompts


def test_build_prompts_is_deterministic_for_a_seed(rows: list[dict]) -> None:
    assert instructions.build_prompts(0) == rows
    assert instructions.build_prompts(1) != rows


def test_every_split_has_prompts_and_no_instruction_crosses_splits(rows: list[dict]) -> None:
    assert {r["split"] for r in rows} == {"sft", "preference", "ppo", "eval"}
    split_of: dict[str, set[str]] = {}
    for r in rows:
        split_of.setdefault(r["instruction"], set()).add(r["split"])
    assert all(len(splits) == 1 for splits in split_of.values())
    assert len(split_of) == len(instructions.EVERYDAY)
    assert 400 <= len(rows) <= 600
    assert len({r["prompt"] for r in rows}) == len(rows)


def test_every_description_is_in_its_prompt(rows: list[dict]) -> None:
    for r in rows:
        assert r["prompt"].startswith(r["instruction"])
        assert 1 <= len(r["instruction_id_list"]) <= 2
        for instruction_id, kwargs in zip(r["instruction_id_list"], r["kwargs"], strict=True):
            assert instruction_id in instructions.DRAWERS
            text, _ = instructions.describe("ifeval", instruction_id, kwargs)
            assert text in r["prompt"], (instruction_id, r["prompt"])
            if instruction_id == "combination:repeat_prompt":
                assert r["prompt"].startswith(kwargs["prompt_to_repeat"] + " ")


def test_outputs_are_what_the_pipeline_and_the_judge_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = instructions.write_outputs(tmp_path, seed=0, ifbench_source=None)
    prompts = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    sft = [json.loads(line) for line in (tmp_path / "sft_prompts.jsonl").read_text().splitlines()]
    assert {r["split"] for r in prompts} == {"preference", "ppo", "eval"}
    assert all(set(r) == {"prompt", "split"} for r in prompts) and all(set(r) == {"prompt"} for r in sft)
    assert counts["constraints.jsonl"] >= len(prompts) + len(sft)
    monkeypatch.setenv("RLHF_IF_DATA", str(tmp_path))
    judge.clear_cache()
    try:
        scores = judge.score([r["prompt"] for r in prompts + sft], ["ok"] * (len(prompts) + len(sft)))
    finally:
        judge.clear_cache()
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_ifbench_keeps_only_prompts_checkable_here(tmp_path: Path) -> None:
    pad = {"N": None, "min_words": None, "max_words": None}
    raw = [
        {"key": 1, "prompt": "Say hi.", "instruction_id_list": ["format:no_whitespace"], "kwargs": [pad]},
        {"key": 2, "prompt": "Start.", "instruction_id_list": ["words:start_verb"], "kwargs": [pad]},
        {"key": 3, "prompt": "Odd.", "instruction_id_list": ["custom:not_a_checker"], "kwargs": [pad]},
    ]
    path = tmp_path / "IFBench_test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in raw))
    got = instructions.ifbench_prompts(path)
    kept = {r["key"] for r in got}
    assert "1" in kept and "3" not in kept
    assert ("2" in kept) == ("words:start_verb" not in instructions.ifbench_unavailable())
    assert got[0] == {
        "prompt": "Say hi.",
        "split": "eval",
        "family": "ifbench",
        "key": "1",
        "instruction_id_list": ["format:no_whitespace"],
        "kwargs": [{}],
    }


# ---------------------------------------------------------------------------------------------------------------
# The judge


def test_judge_scores_the_fraction_of_constraints_followed(table: Path) -> None:
    both = "the sky looks blue because air scatters blue sunlight much more than red light so blue reaches our eyes."
    neither = "The sky is blue because of Rayleigh scattering, which affects short wavelengths the most."
    one = "the sky looks blue because air scatters blue sunlight, much more than red light, toward our eyes."
    assert judge.score([SKY] * 3, [both, neither, one]) == [1.0, 0.0, 0.5]


def test_empty_response_scores_zero(table: Path) -> None:
    assert judge.score([SKY, SKY, JSON], ["", "  \n ", "<think>unfinished"]) == [0.0, 0.0, 0.0]


def test_loose_forgives_a_chatty_first_or_last_line(table: Path) -> None:
    prompts = [JSON, TEA_END]
    responses = [
        'Sure, here it is:\n{"answer": "yeast makes gas that lifts the dough"}',
        "Boil water, pour it over the tea and wait three minutes. Hope this helps!\nLet me know how it goes.",
    ]
    assert judge.score(prompts, responses) == [0.0, 0.0]
    assert judge.score_loose(prompts, responses) == [1.0, 1.0]
    assert judge.score(prompts, [responses[0].split("\n")[1], responses[1].split("\n")[0]]) == [1.0, 1.0]


def test_breakdown_reports_each_constraint(table: Path) -> None:
    half = "the sky is blue, because the air scatters blue sunlight far more than the red light of the sun."
    [row] = judge.breakdown([SKY], [half])
    assert row["strict"] == 0.5 and row["loose"] == 0.5
    assert row["constraints"] == [
        {"id": "change_case:english_lowercase", "strict": True, "loose": True},
        {"id": "punctuation:no_comma", "strict": False, "loose": False},
    ]


def test_a_checker_that_raises_or_is_unknown_counts_as_not_followed(table: Path) -> None:
    # IFBench's quote checker indexes past the end of a response that is all punctuation
    assert judge.score([QUOTES, QUOTES, BOGUS], ["...", '"hi" said to greet', "anything"]) == [0.0, 1.0, 0.0]


def test_unknown_prompt_raises_naming_it_and_the_table(table: Path) -> None:
    prompt = "Write a haiku about a prompt that nobody put in the table. " * 3
    with pytest.raises(ValueError) as caught:
        judge.score([prompt], ["x"])
    assert prompt[:80] in str(caught.value) and str(table / "constraints.jsonl") in str(caught.value)


def test_table_lookup_tolerates_surrounding_whitespace(table: Path) -> None:
    response = "the sky looks blue because the air scatters blue sunlight more than red light."
    assert judge.score([f"  {SKY}\n"], [response]) == [1.0]


def test_judge_reads_the_table_named_by_the_environment(table: Path, tmp_path_factory, monkeypatch) -> None:
    other = tmp_path_factory.mktemp("other")
    _write(other, [{**TABLE[0], "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}])
    monkeypatch.setenv("RLHF_IF_DATA", str(other))
    judge.clear_cache()
    assert judge.score([SKY], ["The Sky Is Blue."]) == [1.0]
    with pytest.raises(ValueError, match="not in the constraint table"):
        judge.score([JSON], ["{}"])
