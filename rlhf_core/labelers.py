"""Simulated labelers: each prefers one of two responses by a Bradley-Terry draw on the gold reward
difference, at its own temperature and with its own taste for length."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from itertools import combinations

from pydantic import BaseModel, ConfigDict, Field


class LabelerConfig(BaseModel):
    """One simulated labeler."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Labeler id recorded with each label.")
    temperature: float = Field(1.0, gt=0, description="Noise relative to the pool's shared scale; higher is noisier.")
    length_bias: float = Field(0.0, description="Extra utility per word of the response (a taste for length).")


def default_labelers() -> list[LabelerConfig]:
    return [
        LabelerConfig(name="ann", temperature=0.8),
        LabelerConfig(name="bo", temperature=1.0),
        LabelerConfig(name="cy", temperature=1.0, length_bias=0.15),
        LabelerConfig(name="di", temperature=1.3, length_bias=-0.1),
    ]


def preference_probability(
    gold: tuple[float, float], length: tuple[int, int], labeler: LabelerConfig, noise_scale: float
) -> float:
    """P(labeler prefers a over b) = sigmoid((utility_a - utility_b) / (temperature * noise_scale)), for the gold
    rewards and word counts of responses a and b."""
    margin = gold[0] - gold[1] + labeler.length_bias * (length[0] - length[1])
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
) -> float:
    """The shared noise scale at which labelers' expected pairwise agreement on these items is the
    target (bisection on log-scale; agreement falls monotonically as noise grows)."""

    def agreement(scale: float) -> float:
        probs = [
            [preference_probability(gold, length, lab, scale) for gold, length in zip(golds, lengths, strict=True)]
            for lab in labelers
        ]
        return expected_agreement(probs)

    low, high = math.log(1e-3), math.log(1e3)
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if agreement(math.exp(mid)) > target_agreement else (low, mid)
    return math.exp((low + high) / 2)


def cohen_kappa(labels_a: Sequence[int], labels_b: Sequence[int]) -> float:
    """Cohen's kappa of two binary label sequences: (p_observed - p_chance) / (1 - p_chance)."""
    n = len(labels_a)
    observed = sum(a == b for a, b in zip(labels_a, labels_b, strict=True)) / n
    pa, pb = sum(labels_a) / n, sum(labels_b) / n
    chance = pa * pb + (1 - pa) * (1 - pb)
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
) -> list[list[int]]:
    """Every labeler's label for every item: 1 when it prefers the first response."""
    return [
        [
            int(rng.random() < preference_probability(gold, length, lab, noise_scale))
            for gold, length in zip(golds, lengths, strict=True)
        ]
        for lab in labelers
    ]
