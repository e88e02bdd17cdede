"""The callables the loops take from their caller."""

from __future__ import annotations

from collections.abc import Callable

# ``on_metrics(metrics, step)``: a loop's step metrics under their bare names ("kl", "loss"); the caller decides
# where they go (the tasks put them in their phase's MLflow namespace, see infra/catalog.py).
MetricsCallback = Callable[[dict[str, float], int], None]

# ``gold(prompts, responses) -> one float per response``: the hidden judge behind simulated labelers and evaluation.
GoldScorer = Callable[[list[str], list[str]], list[float]]
# (prompt, response) -> the gold reward attribute by attribute, the parts summing to the gold reward
GoldBreakdown = Callable[[str, str], dict[str, float]]
