"""Labelers: simulated ones, each preferring one of two responses by a Bradley-Terry draw on the gold reward
difference, at its own temperature and with its own taste for length; people's labels (:class:`HumanLabel`) of the
pairs they are shown (:class:`LabelingPair`); and what labels say about the labelers."""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from itertools import combinations

from pydantic import BaseModel, ConfigDict, Field

STRENGTHS = {1: "negligibly better", 2: "slightly better", 3: "better", 4: "significantly better"}  # Llama 2's scale
STRENGTH_SCALE = ", ".join(f"{k} {v}" for k, v in STRENGTHS.items())
CHOICES = ("a", "b", "tie")
NOISE_RANGE = (1e-3, 1e3)  # the shared noise scales calibration searches


@dataclass
class LabelingPair:
    """A pair as people see it, the two responses as A and B in random order, with their hidden gold rewards."""

    pair_id: str
    prompt: str
    response_a: str
    response_b: str
    a_gold: float
    b_gold: float
    swapped: bool  # B is the first of the two samples


@dataclass
class HumanLabel:
    """One person's judgment of one pair."""

    pair_id: str
    choice: str  # one of CHOICES
    labeler: str
    strength: int | None = None


class LabelerConfig(BaseModel):
    """One simulated labeler."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Labeler id recorded with each label.")
    temperature: float = Field(1.0, gt=0, description="Noise relative to the pool's shared scale; higher is noisier.")
    length_bias: float = Field(
        0.0,
        description="A taste for length: extra utility per word of the response, in standard deviations of the gold "
        "reward per standard deviation of the responses' word counts over the pairs being labeled, so that it weighs "
        "the same against the judge whatever the judge's scale and the responses' lengths.",
    )


def default_labelers() -> list[LabelerConfig]:
    return [
        LabelerConfig(name="ann", temperature=0.8),
        LabelerConfig(name="bo", temperature=1.0),
        LabelerConfig(name="cy", temperature=1.0, length_bias=0.3),
        LabelerConfig(name="di", temperature=1.3, length_bias=-0.2),
    ]


def gold_per_word(golds: Sequence[tuple[float, float]], lengths: Sequence[tuple[int, int]]) -> float:
    """The gold reward's standard deviation over the responses per standard deviation of their word counts: what a
    labeler's ``length_bias`` is measured in (0 where the lengths do not vary)."""
    gold = [g for pair in golds for g in pair]
    words = [n for pair in lengths for n in pair]
    spread = statistics.pstdev(words) if len(words) > 1 else 0.0
    return statistics.pstdev(gold) / spread if spread > 0 else 0.0


def preference_probability(
    gold: tuple[float, float],
    length: tuple[int, int],
    labeler: LabelerConfig,
    noise_scale: float,
    *,
    word_value: float = 1.0,
) -> float:
    """P(labeler prefers a over b) = sigmoid((utility_a - utility_b) / (temperature * noise_scale)), for the gold
    rewards and word counts of responses a and b; a word is worth ``length_bias * word_value`` in gold
    (:func:`gold_per_word`)."""
    margin = gold[0] - gold[1] + labeler.length_bias * word_value * (length[0] - length[1])
    z = margin / (labeler.temperature * noise_scale)
    return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))


def expected_agreement(probabilities: Sequence[Sequence[float]]) -> float:
    """Mean over labeler pairs and items of P(both pick the same side).
    probabilities[l][i] is labeler l's probability of preferring the first response of item i."""
    pairs = list(combinations(range(len(probabilities)), 2))
    n_items = len(probabilities[0])
    total = sum(
        p * q + (1 - p) * (1 - q) for a, b in pairs for p, q in zip(probabilities[a], probabilities[b], strict=True)
    )
    return total / (len(pairs) * n_items)


def calibrate_noise_scale(
    golds: Sequence[tuple[float, float]],
    lengths: Sequence[tuple[int, int]],
    labelers: Sequence[LabelerConfig],
    target_agreement: float,
    *,
    word_value: float = 1.0,
) -> float:
    """The shared noise scale at which labelers' expected pairwise agreement on these items is the
    target (bisection on log-scale; agreement falls monotonically as noise grows)."""

    def agreement(scale: float) -> float:
        probs = [
            [
                preference_probability(gold, length, lab, scale, word_value=word_value)
                for gold, length in zip(golds, lengths, strict=True)
            ]
            for lab in labelers
        ]
        return expected_agreement(probs)

    low, high = math.log(NOISE_RANGE[0]), math.log(NOISE_RANGE[1])
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if agreement(math.exp(mid)) > target_agreement else (low, mid)
    return math.exp((low + high) / 2)


def cohen_kappa(labels_a: Sequence[Hashable], labels_b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two label sequences over any categories: (p_observed - p_chance) / (1 - p_chance), where
    p_chance = sum over categories of the product of the two labelers' rates."""
    n = len(labels_a)
    observed = sum(a == b for a, b in zip(labels_a, labels_b, strict=True)) / n
    rate_a, rate_b = Counter(labels_a), Counter(labels_b)
    chance = sum(rate_a[k] * rate_b[k] for k in rate_a) / n**2
    return 1.0 if chance == 1 else (observed - chance) / (1 - chance)


def agreement_stats(labels: Sequence[Sequence[int]]) -> dict[str, float]:
    """Pairwise agreement and mean Cohen's kappa of labelers who labeled the same items.
    labels[l][i] is 1 when labeler l preferred the first response of item i."""
    pairs = list(combinations(range(len(labels)), 2))
    agree = [sum(a == b for a, b in zip(labels[i], labels[j], strict=True)) / len(labels[i]) for i, j in pairs]
    kappas = [cohen_kappa(labels[i], labels[j]) for i, j in pairs]
    return {"labeler_agreement": sum(agree) / len(agree), "labeler_kappa": sum(kappas) / len(kappas)}


def draw_labels(
    golds: Sequence[tuple[float, float]],
    lengths: Sequence[tuple[int, int]],
    labelers: Sequence[LabelerConfig],
    *,
    noise_scale: float,
    rng: random.Random,
    word_value: float = 1.0,
) -> list[list[int]]:
    """Every labeler's label for every item: 1 when it prefers the first response."""
    return [
        [
            int(rng.random() < preference_probability(gold, length, lab, noise_scale, word_value=word_value))
            for gold, length in zip(golds, lengths, strict=True)
        ]
        for lab in labelers
    ]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def human_label_stats(labels: Sequence[tuple[str, str, str]], gold: dict[str, str]) -> dict[str, float]:
    """What people's labels say about the people (InstructGPT's and Llama 2's calibration signals).

    ``labels``: (item, labeler, choice) triples, several labelers per item where they overlap; ``gold``: each
    item's choice by the gold reward (``"tie"`` on equal gold). Returns the share of ties, pairwise agreement and
    Cohen's kappa averaged over labeler pairs that share items (``kappa/<a>/<b>`` per pair), per-item agreement
    on items with several labels, and per labeler its label count, its agreement with the majority of the other
    labelers (items where they have a strict majority) and with gold (items gold decides). NaN where nothing
    overlaps."""
    by_item: dict[str, dict[str, str]] = defaultdict(dict)
    for item, labeler, choice in labels:
        by_item[item][labeler] = choice
    labelers = sorted({labeler for _, labeler, _ in labels})
    stats: dict[str, float] = {
        "n_labels": len(labels),
        "n_labelers": len(labelers),
        "tie_rate": _mean([choice == "tie" for _, _, choice in labels]),
        "overlap_pairs": sum(len(given) > 1 for given in by_item.values()),
    }
    agreements, kappas = [], []
    for a, b in combinations(labelers, 2):
        shared = [item for item, given in by_item.items() if a in given and b in given]
        if shared:
            first, second = [by_item[i][a] for i in shared], [by_item[i][b] for i in shared]
            agreements.append(_mean([x == y for x, y in zip(first, second, strict=True)]))
            kappas.append(stats.setdefault(f"kappa/{a}/{b}", cohen_kappa(first, second)))
    stats["labeler_agreement"], stats["labeler_kappa"] = _mean(agreements), _mean(kappas)
    stats["pair_agreement"] = _mean(
        [_mean([x == y for x, y in combinations(g.values(), 2)]) for g in by_item.values() if len(g) > 1]
    )
    decided = [(item, choice) for item, _, choice in labels if choice != "tie" and gold.get(item, "tie") != "tie"]
    stats["label_gold_accuracy"] = _mean([gold[item] == choice for item, choice in decided])
    for labeler in labelers:
        mine = {item: given[labeler] for item, given in by_item.items() if labeler in given}
        majority = {}
        for item in mine:
            others = Counter(c for who, c in by_item[item].items() if who != labeler).most_common(2)
            if others and (len(others) == 1 or others[0][1] > others[1][1]):
                majority[item] = others[0][0]
        stats[f"labeler/{labeler}/labels"] = len(mine)
        stats[f"labeler/{labeler}/majority_agreement"] = _mean([mine[i] == c for i, c in majority.items()])
        stats[f"labeler/{labeler}/gold_agreement"] = _mean(
            [gold[i] == c for i, c in mine.items() if c != "tie" and gold.get(i, "tie") != "tie"]
        )
    return stats
