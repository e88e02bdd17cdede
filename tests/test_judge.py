"""The gold judge's one door: every call's scores checked (count, number, finite), a failure naming the judge."""

import math

import numpy as np
import pytest

from rlhf_core.judge import CheckedJudge, JudgeError, checked_scores, gold_judge

PROMPTS, RESPONSES = ["say hi", "say bye"], ["hi", ""]


def test_good_scores_come_back_as_floats_numpy_and_bools_included():
    assert checked_scores("m:f", [1, np.float32(0.5)], PROMPTS, RESPONSES) == [1.0, 0.5]
    assert checked_scores("m:f", (True, False), PROMPTS, RESPONSES) == [1.0, 0.0]
    assert checked_scores("m:f", np.array([2.0, -1.0]), PROMPTS, RESPONSES) == [2.0, -1.0]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([1.0], r"^data.gold_reward='m:f' returned 1 scores for 2 responses: it must return one each$"),
        ([1.0, 2.0, 3.0], r"returned 3 scores for 2 responses"),
        ([1.0, math.nan], r"returned nan for response 1 \('' to the prompt 'say bye'\): a score must be a finite"),
        ([-math.inf, 1.0], r"returned -inf for response 0 \('hi' to the prompt 'say hi'\)"),
        ([1.0, "good"], r"returned 'good' for response 1 .*: not a number"),
        ([None, 1.0], r"returned None for response 0 .*: not a number"),
        (7.0, r"returned float, not a list of scores"),
    ],
)
def test_a_wrong_count_a_non_number_or_a_non_finite_score_is_named(raw, message):
    with pytest.raises(JudgeError, match=message):
        checked_scores("m:f", raw, PROMPTS, RESPONSES)


def test_a_judge_that_raises_is_named_and_the_toy_worlds_judge_passes():
    def explodes(prompts, responses):
        raise KeyError("topic")

    with pytest.raises(JudgeError, match=r"^data.gold_reward='m:f' raised KeyError: 'topic'$"):
        CheckedJudge("m:f", explodes)(PROMPTS, RESPONSES)
    toy = gold_judge(None)
    scores = toy(["explain briefly ocean :"], ["the ocean is deep water ."])
    assert len(scores) == 1 and math.isfinite(scores[0])
    with pytest.raises(JudgeError, match=r"^the toy world's gold judge returned 0 scores for 1"):
        checked_scores(None, [], ["p"], ["r"])
