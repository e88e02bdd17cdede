"""Training-health alarms for a PPO phase, from the monitoring list of RLHF's known failure modes: length hacking,
entropy collapse (mode collapse) and reward-model exploitation. A KL runaway is a hard stop already (``ppo.max_kl``).

Each alarm compares the mean of a metric over the phase's first ``window`` steps with its mean over the last
``window`` steps, so one noisy step does not raise it.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from pydantic import BaseModel, ConfigDict, Field

ALARMS = {
    "length_hacking": "response length grew past ppo.alarms.length_growth while the gold reward (where known) did not "
    "rise",
    "entropy_collapse": "per-token entropy fell below ppo.alarms.entropy_floor, or by more than "
    "ppo.alarms.entropy_drop",
    "reward_exploitation": "the reward model's score rose while the gold reward fell, both by more than "
    "ppo.alarms.exploitation_gap; or, with a reward ensemble, while the members' disagreement grew past "
    "ppo.alarms.disagreement_growth",
}


class AlarmConfig(BaseModel):
    """Thresholds of the training-health alarms."""

    model_config = ConfigDict(extra="forbid")
    window: int = Field(5, ge=1, description="Steps averaged at each end: the first `window` against the last.")
    length_growth: float = Field(
        0.5, gt=0, description="Length hacking: response length grew by more than this fraction."
    )
    entropy_floor: float = Field(0.2, ge=0, description="Entropy collapse: per-token entropy below this, in nats.")
    entropy_drop: float = Field(
        0.6, gt=0, le=1, description="Entropy collapse: per-token entropy fell by more than this fraction."
    )
    exploitation_gap: float = Field(
        0.25,
        ge=0,
        description="Reward-model exploitation: the score rose and the gold reward fell, each by more than this.",
    )

    disagreement_growth: float = Field(
        0.5,
        gt=0,
        description="Reward-model exploitation: the ensemble's disagreement grew by more than this fraction while its "
        "score rose (reward.ensemble_size > 1).",
    )


@dataclass(frozen=True)
class Alarm:
    name: str  # a key of ALARMS
    step: int
    message: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def check_alarms(history: list[dict[str, float]], config: AlarmConfig) -> list[Alarm]:
    """The alarms a PPO phase's step metrics (``reward``, ``gold_reward`` where known, ``entropy``,
    ``response_length``) raise at their last step; none before there are two windows of steps."""
    w, step = config.window, len(history)
    if step < 2 * w:
        return []

    def ends(key: str) -> tuple[float, float]:
        return statistics.mean(h[key] for h in history[:w]), statistics.mean(h[key] for h in history[-w:])

    alarms = []
    gold = ends("gold_reward") if all("gold_reward" in h for h in history) else None
    (length_0, length_1), (entropy_0, entropy_1), (reward_0, reward_1) = map(
        ends, ("response_length", "entropy", "reward")
    )
    if length_1 > (1 + config.length_growth) * length_0 and (gold is None or gold[1] <= gold[0]):
        unchanged = f" while gold reward went {gold[0]:.2f} -> {gold[1]:.2f}" if gold else ""
        alarms.append(
            Alarm("length_hacking", step, f"response length {length_0:.1f} -> {length_1:.1f} tokens{unchanged}")
        )
    if entropy_1 < config.entropy_floor or entropy_1 < (1 - config.entropy_drop) * entropy_0:
        alarms.append(Alarm("entropy_collapse", step, f"entropy {entropy_0:.2f} -> {entropy_1:.2f} nats per token"))
    if gold and reward_1 - reward_0 > config.exploitation_gap and gold[0] - gold[1] > config.exploitation_gap:
        message = (
            f"reward-model score {reward_0:.2f} -> {reward_1:.2f} while gold reward {gold[0]:.2f} -> {gold[1]:.2f}"
        )
        alarms.append(Alarm("reward_exploitation", step, message))
    elif all("rm_disagreement" in h for h in history) and reward_1 > reward_0:
        spread_0, spread_1 = ends("rm_disagreement")
        if spread_1 > (1 + config.disagreement_growth) * spread_0:
            message = f"reward-model score {reward_0:.2f} -> {reward_1:.2f} while the ensemble's disagreement went "
            alarms.append(Alarm("reward_exploitation", step, message + f"{spread_0:.2f} -> {spread_1:.2f}"))
    return alarms
