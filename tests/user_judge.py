"""A user's own gold judge, importable as ``user_judge:judge`` in tests: distinct on-topic words count,
rude words cost two, nothing else (unlike the toy world's gold reward, length does not matter)."""

import math

from rlhf_core import world
from rlhf_core.world import RUDE, TOPICS


def judge(prompts: list[str], responses: list[str]) -> list[float]:
    scores = []
    for prompt, response in zip(prompts, responses, strict=True):
        topic = next(t for t in TOPICS if t in prompt.split())
        words = response.split()
        scores.append(len(set(words) & set(TOPICS[topic])) - 2.0 * sum(w in RUDE for w in words))
    return scores


def broken(prompts: list[str], responses: list[str]) -> list[float]:
    return [math.nan] * len(responses)


def one_short(prompts: list[str], responses: list[str]) -> list[float]:
    """Forgets the last response: the wrong count that once crashed a run mid-way."""
    return judge(prompts, responses)[:-1]


def nan_for_empty(prompts: list[str], responses: list[str]) -> list[float]:
    """NaN where a response is empty (as a policy's can be), a fine score elsewhere."""
    return [math.nan if not r.strip() else s for r, s in zip(responses, judge(prompts, responses), strict=True)]


def short_on_big_batches(prompts: list[str], responses: list[str]) -> list[float]:
    """Right on the small batch tried before the run, one score short on the larger batches a run scores later."""
    scores = judge(prompts, responses)
    return scores[:-1] if len(responses) > 20 else scores


AS_WRITTEN = set(world.all_prompts())


def as_written_only(prompts: list[str], responses: list[str]) -> list[float]:
    """The judge above, refusing any prompt that is not a toy prompt exactly as written (a chat template's rendering
    of one fails): a judge that looks its prompts up, as a checker of verifiable instructions does."""
    if unknown := [p for p in prompts if p not in AS_WRITTEN]:
        raise KeyError(f"not a prompt as written: {unknown[0]!r}")
    return judge(prompts, responses)
