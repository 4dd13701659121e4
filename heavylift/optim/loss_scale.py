"""Dynamic loss scaling for fp16 (the DeepSpeed/apex rule), as a small state machine."""

from __future__ import annotations

from dataclasses import dataclass

from heavylift.config.schema import PrecisionConfig


@dataclass
class LossScaler:
    """``scale`` multiplies the loss; ``update(found_inf)`` runs once per optimizer step.

    On overflow the step is skipped and, once ``hysteresis`` overflows have been absorbed, the scale
    halves (never below ``min_scale``); after ``window`` clean steps in a row it doubles. A static
    scaler (``dynamic=False``) never changes. bf16/fp32 use ``LossScaler.disabled()`` (scale 1).
    """

    scale: float = 1.0
    dynamic: bool = False
    window: int = 1000
    min_scale: float = 1.0
    hysteresis: int = 2
    _good_steps: int = 0
    _hysteresis_left: int = 2

    @classmethod
    def from_config(cls, cfg: PrecisionConfig) -> "LossScaler":
        if cfg.dtype != "fp16":
            return cls()
        if cfg.loss_scale > 0:
            return cls(scale=cfg.loss_scale)
        return cls(scale=2.0 ** cfg.initial_scale_power, dynamic=True, window=cfg.loss_scale_window,
                   min_scale=cfg.min_loss_scale, hysteresis=cfg.hysteresis,
                   _hysteresis_left=cfg.hysteresis)

    def update(self, found_inf: bool) -> None:
        if not self.dynamic:
            return
        if found_inf:
            self._good_steps = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self.scale = max(self.scale / 2.0, self.min_scale)
                self._hysteresis_left = self.hysteresis
            return
        self._good_steps += 1
        if self._good_steps % self.window == 0:
            self.scale *= 2.0
            self._hysteresis_left = self.hysteresis

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self._good_steps, "hysteresis_left": self._hysteresis_left}

    def load_state_dict(self, sd: dict) -> None:
        self.scale = sd["scale"]
        self._good_steps = sd["good_steps"]
        self._hysteresis_left = sd["hysteresis_left"]
