"""Exponential moving average of a model's weights (Polyak averaging).

After every ``every``-th optimizer step: ``ema = decay * ema + (1 - decay) * w`` for
floating-point parameters and buffers (BatchNorm running statistics included);
integer buffers (``num_batches_tracked``) are copied. The averaged copy lives on
the model's device, is never trained, and is evaluated like the model.
"""
import copy

import torch


class ModelEMA:
    def __init__(self, model, decay=0.9999, every=1):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.every, self.updates = float(decay), int(every), 0
        self._pairs = None

    def _tensors(self, model):
        src = list(model.state_dict(keep_vars=True).values())
        dst = list(self.module.state_dict(keep_vars=True).values())
        floats = [(d.data, s.data) for d, s in zip(dst, src) if d.is_floating_point()]
        others = [(d.data, s.data) for d, s in zip(dst, src) if not d.is_floating_point()]
        return floats, others

    @torch.no_grad()
    def update(self, model, step):
        """Average ``model`` (the unwrapped training model) in, if ``step`` is on the cadence."""
        if step % self.every:
            return
        if self._pairs is None or self._pairs[2] is not model:
            self._pairs = (*self._tensors(model), model)
        floats, others, _ = self._pairs
        self.updates += 1
        if floats:
            dst, src = [d for d, _ in floats], [s for _, s in floats]
            torch._foreach_lerp_(dst, src, 1.0 - self.decay)
        for d, s in others:
            d.copy_(s)

    def state_dict(self):
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state):
        self.module.load_state_dict(state["module"])
        self.updates = int(state.get("updates", 0))
