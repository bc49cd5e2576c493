"""SGD with optional weight-decay exemptions, and per-iteration LR schedules with warmup.

Weight decay can skip three kinds of parameters (``train.wd_exempt``):
``norm`` (weights and biases of normalisation layers), ``bias`` (every bias) and
``marked`` (names a module lists in its ``no_weight_decay`` attribute, a list of
its own parameter names or a method returning one; CE marks its mixing ``theta``).

The schedule is a function of the optimizer step, so the LR changes every
iteration (warmup and cosine/poly are smooth; step/multistep drop at epoch
boundaries). Warmup multiplies the main schedule linearly from
``warmup_start_factor`` to 1; cosine/poly then run over the iterations after warmup.
"""
import math

import torch
import torch.nn as nn

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _marked_names(module):
    marked = getattr(module, "no_weight_decay", None)
    if callable(marked):
        marked = marked()
    return set(marked or ())


def param_groups(model, weight_decay, exempt=()):
    """Split trainable parameters into a decayed and a non-decayed group (empty groups dropped)."""
    exempt = set(exempt)
    decay, no_decay, seen = [], [], set()
    for mod_name, module in model.named_modules():
        marked = _marked_names(module) if "marked" in exempt else set()
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            skip = (("norm" in exempt and isinstance(module, _NORMS))
                    or ("bias" in exempt and name == "bias")
                    or name in marked)
            (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model, train_cfg):
    """SGD (momentum, nesterov, weight decay with exemptions) over ``model``'s trainable parameters."""
    groups = param_groups(model, train_cfg["weight_decay"], train_cfg["wd_exempt"])
    return torch.optim.SGD(groups, lr=train_cfg["lr"], momentum=train_cfg["momentum"],
                           nesterov=train_cfg["nesterov"] and train_cfg["momentum"] > 0,
                           weight_decay=train_cfg["weight_decay"])


def lr_factor(step, train_cfg, iters_per_epoch):
    """Multiplier of ``train.lr`` at optimizer step ``step`` (0-based)."""
    total = train_cfg["epochs"] * iters_per_epoch
    warmup = int(round(train_cfg["warmup_epochs"] * iters_per_epoch))
    kind = train_cfg["schedule"]
    if kind == "step":
        f = train_cfg["gamma"] ** (step // (train_cfg["step_size"] * iters_per_epoch))
    elif kind == "multistep":
        f = train_cfg["gamma"] ** sum(step >= m * iters_per_epoch for m in train_cfg["milestones"])
    elif kind in ("cosine", "poly"):
        t = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
        floor = train_cfg["min_lr"] / train_cfg["lr"]
        shape = 0.5 * (1 + math.cos(math.pi * t)) if kind == "cosine" else (1 - t) ** train_cfg["power"]
        f = floor + (1 - floor) * shape
    else:
        f = 1.0
    if step < warmup:
        start = train_cfg["warmup_start_factor"]
        f *= start + (1 - start) * step / warmup
    return f


class IterScheduler:
    """Sets every group's LR to ``base_lr * lr_factor(step)``; ``step()`` after each optimizer step.

    Its state is the step counter, so a resumed run gets the exact LR back.
    """

    def __init__(self, optimizer, train_cfg, iters_per_epoch):
        self.optimizer = optimizer
        self.cfg = {k: train_cfg[k] for k in ("epochs", "warmup_epochs", "warmup_start_factor", "schedule",
                                              "step_size", "milestones", "gamma", "power", "min_lr", "lr")}
        self.iters_per_epoch = max(int(iters_per_epoch), 1)
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.last_step = 0
        self._apply()

    def _apply(self):
        f = lr_factor(self.last_step, self.cfg, self.iters_per_epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f

    def step(self):
        self.last_step += 1
        self._apply()

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self):
        return {"last_step": self.last_step, "iters_per_epoch": self.iters_per_epoch}

    def load_state_dict(self, state):
        self.last_step = int(state["last_step"])
        self._apply()
