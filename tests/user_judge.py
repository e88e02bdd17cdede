"""A user's own gold judge, importable as ``user_judge:judge`` in tests: distinct on-topic words count,
rude words cost two, nothing else (unlike the toy world's gold reward, length does not matter)."""

import math

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
