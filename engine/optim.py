"""SGD with optional weight-decay exemptions, and per-iteration LR schedules with warmup.

Weight decay can skip three kinds of parameters (``train.wd_exempt``):
``norm`` (weights and biases of normalisation layers), ``bias`` (every bias) and
``marked`` (names a module lists in its ``no_weight_decay`` attribute, a list of
its own parameter names or a method returning one; CE marks its mixing ``theta``).

Fine-tuning: ``train.backbone_lr_mult`` gives every parameter outside the classifier
(the model's ``head_prefix``) the LR ``train.lr * backbone_lr_mult``; groups are split
by both head/backbone and decay/no-decay, each group's ``initial_lr`` holds its own
peak LR and the schedule scales each by the same factor (a checkpoint keeps them).

The schedule is a function of the optimizer step, so the LR changes every
iteration (warmup and cosine/poly are smooth; step/multistep drop at epoch
boundaries). Warmup multiplies the main schedule linearly from
``warmup_start_factor`` to 1; cosine/poly then run over the iterations after warmup.
"""
import math

import torch
import torch.nn as nn

from core.fields import ConfigError

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _marked_names(module):
    marked = getattr(module, "no_weight_decay", None)
    if callable(marked):
        marked = marked()
    return set(marked or ())


def param_groups(model, weight_decay, exempt=(), backbone_lr_mult=1.0):
    """Split trainable parameters into decayed and non-decayed groups (empty groups dropped).

    With ``backbone_lr_mult != 1`` each is split again into the classifier ('head', first) and the
    rest ('backbone'), whose group carries ``lr_mult``; otherwise the groups are as without fine-tuning.
    """
    exempt = set(exempt)
    head = None
    if backbone_lr_mult != 1:
        head = getattr(model, "head_prefix", None)
        if not head:
            raise ConfigError(f"train.backbone_lr_mult needs to know the classifier: {type(model).__name__} "
                              f"declares no head_prefix; set train.backbone_lr_mult=1")
    parts = ("head", "backbone") if head else ("all",)
    buckets, seen = {(part, decayed): [] for part in parts for decayed in (True, False)}, set()
    for mod_name, module in model.named_modules():
        marked = _marked_names(module) if "marked" in exempt else set()
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            skip = (("norm" in exempt and isinstance(module, _NORMS))
                    or ("bias" in exempt and name == "bias")
                    or name in marked)
            part = "all" if not head else "head" if f"{mod_name}.{name}".startswith(head) else "backbone"
            buckets[(part, not skip)].append(p)
    groups = []
    for (part, decayed), params in buckets.items():
        group = {"params": params, "weight_decay": weight_decay if decayed else 0.0}
        if head:
            group.update(name=part, lr_mult=backbone_lr_mult if part == "backbone" else 1.0)
        groups.append(group)
    return [g for g in groups if g["params"]]


def group_lrs(optimizer):
    """{'head': lr, 'backbone': lr} of an optimizer with fine-tuning groups ({} without)."""
    return {g["name"]: g["lr"] for g in optimizer.param_groups if g.get("name") in ("head", "backbone")}


def build_optimizer(model, train_cfg):
    """SGD (momentum, nesterov, weight decay with exemptions) over ``model``'s trainable parameters."""
    groups = param_groups(model, train_cfg["weight_decay"], train_cfg["wd_exempt"],
                          train_cfg.get("backbone_lr_mult", 1.0))
    for g in groups:
        g["lr"] = train_cfg["lr"] * g.get("lr_mult", 1.0)
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
    """Sets every group's LR to its own ``initial_lr * lr_factor(step)``; ``step()`` after each optimizer step.

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
