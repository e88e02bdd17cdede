"""KL coefficient controllers for the penalty ``-kl_coef * KL(policy || reference)``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FixedKLController:
    """A constant coefficient."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


@dataclass
class AdaptiveKLController:
    """Proportional control of the KL coefficient towards a target KL (Ziegler et al. 2019,
    "Fine-Tuning Language Models from Human Preferences", section 2.2):

        e_t = clip(KL_t / target - 1, -0.2, 0.2),   beta_{t+1} = beta_t * (1 + K_beta * e_t)

    with K_beta = n_steps / horizon, where n_steps is the number of samples in the batch.
    """

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


KLController = FixedKLController | AdaptiveKLController
