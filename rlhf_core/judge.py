"""The gold judge, called through one door that checks what it returns: one finite number per response, else a
JudgeError naming the judge and the response at fault.

Why: the judge's scores become the simulated labels, the RLVR reward and every win rate. A missing score or a NaN
would otherwise flow silently into all of them (a judge that returned NaN for some responses once gave a run that
"succeeded" with a gold reward of nan and a win rate of 0.25), or surface as a bare ``zip()`` error mid-run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from rlhf_core.data import load_gold_scorer
from rlhf_core.types import GoldScorer


class JudgeError(ValueError):
    """The gold judge raised, or returned something other than one finite number per response."""


def judge_name(spec: str | None) -> str:
    return f"data.gold_reward={spec!r}" if spec else "the toy world's gold judge"


def _clip(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def checked_scores(spec: str | None, raw: object, prompts: list[str], responses: list[str]) -> list[float]:
    """``raw`` (what the judge returned for ``responses``) as floats; JudgeError unless it holds exactly one finite
    number per response."""
    name = judge_name(spec)
    try:
        raw = list(raw)  # type: ignore[call-overload]
    except TypeError as e:
        raise JudgeError(f"{name} returned {type(raw).__name__}, not a list of scores: {e}") from e
    if len(raw) != len(responses):
        raise JudgeError(f"{name} returned {len(raw)} scores for {len(responses)} responses: it must return one each")
    scores = []
    for index, (value, prompt, response) in enumerate(zip(raw, prompts, responses, strict=True)):
        where = f"response {index} ({_clip(response)} to the prompt {_clip(prompt)})"
        try:
            score = float(value)
        except (TypeError, ValueError) as e:
            raise JudgeError(f"{name} returned {value!r} for {where}: not a number") from e
        if not math.isfinite(score):
            raise JudgeError(f"{name} returned {score} for {where}: a score must be a finite number")
        scores.append(score)
    return scores


@dataclass(frozen=True)
class CheckedJudge:
    """A gold judge (``spec``: ``'package.module:function'``, or None for the toy world's) whose every call is
    checked by :func:`checked_scores`; an exception inside it is a JudgeError naming it."""

    spec: str | None
    scorer: GoldScorer
    as_written: Mapping[str, str] = field(default_factory=dict)  # prompt in the model's chat format -> the user's text

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        prompts = [self.as_written.get(prompt, prompt) for prompt in prompts]
        try:
            raw = self.scorer(prompts, responses)
        except Exception as e:
            raise JudgeError(f"{judge_name(self.spec)} raised {type(e).__name__}: {e}") from e
        return checked_scores(self.spec, raw, prompts, responses)


def gold_judge(spec: str | None, as_written: Mapping[str, str] | None = None) -> CheckedJudge:
    """The gold judge named by ``data.gold_reward`` (the toy world's for None), checked on every call. It reads each
    prompt as the user wrote it (``as_written``: the chat-template rendering -> the user's text), not as the model
    sees it, so that it judges the instruction rather than having to find it inside a template."""
    return CheckedJudge(spec, load_gold_scorer(spec), dict(as_written or {}))
