"""An exponential moving average of the trainable weights (``training.ema``), used for validation images and
exports, saved in checkpoints so resuming stays exact.

Every ``ema_update_every`` optimizer steps (skipped non-finite steps excepted)::

    θ_ema ← θ_ema + (1 − d) (θ − θ_ema),   d = min(ema_decay, (1 + n) / (10 + n)),  n = updates so far

the warm-up of ``d`` as in diffusers' ``EMAModel`` (``use_ema_warmup`` off: its ``(1 + n) / (10 + n)`` cap), so an
early export is not dominated by the initial weights. diffusers' ``EMAModel`` keeps its copy on the weights' device;
this one can keep it on the CPU (``ema_device: cpu``), which is what makes an EMA of a full fine-tune fit beside
the model on a GPU, and it averages only what trains (LoRA factors, token rows or the full weights).
"""

from __future__ import annotations

import contextlib

import torch


class TrainableEMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float, every: int, device: str | torch.device | None):
        self.params, self.decay, self.every = list(params), decay, every
        self.device = None if device in (None, "same") else torch.device(device)
        self.shadow = [p.detach().to(self.device or p.device, torch.float32, copy=True) for p in self.params]
        self.updates = 0

    def rate(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step`` (1-based)."""
        if step % self.every:
            return
        weight = 1.0 - self.rate()
        current = [p.detach().to(s.device, torch.float32) for p, s in zip(self.params, self.shadow)]
        torch._foreach_lerp_(self.shadow, current, weight)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self):
        """The averaged weights in the model for the duration (validation, export); the trained ones after."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s.to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"ema.{i}": s.detach().cpu().contiguous() for i, s in enumerate(self.shadow)}
        return state | {"ema.updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.shadow) + 1:
            raise ValueError(f"the checkpoint's EMA has {len(state) - 1} tensors, this run trains {len(self.shadow)}")
        with torch.no_grad():
            for i, s in enumerate(self.shadow):
                s.copy_(state[f"ema.{i}"])
        self.updates = int(state["ema.updates"])
