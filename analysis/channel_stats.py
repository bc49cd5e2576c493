"""Per-channel activation statistics of a model, gathered by forward hooks (used by tools.analyze_channels).

The CE paper's argument is about *inhibited channels*: after a norm and a ReLU, some
channels are (almost) always zero and carry little. :class:`ChannelProbe` hooks

* every post-activation place of a backbone (a *site*): each norm -> ReLU inside a
  residual branch (``bn1``, and ``bn2`` of a bottleneck; the ReLU is applied in the hook
  because the block calls it functionally), each residual block's output (after its
  ReLU), the ResNet stem's ReLU and every conv-norm-ReLU6 of MobileNetV2 (its block
  outputs are linear bottlenecks, so they are not sites);
* every plug-in and weight-excited conv, to say what the block is doing: CE's mixing
  weight sigmoid(theta) and the spread of its IR gains; SE's gates; the LWE gates and
  MWE magnitudes of WE convs (functions of the weights alone); the ED path's output norm
  relative to the residual branch it is added to.

Accumulation is in float64 on the CPU; a site's per-channel *magnitude* is the mean of
its (non-negative) post-activation output over images and positions.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from blocks.ce import CE
from blocks.ed import ED
from blocks.se import SE
from blocks.we import WEConv2d
from models.mobilenetv2 import ConvNormAct
from models.resnet import Bottleneck, ResidualBlock


@dataclass
class Site:
    """One post-activation place: ``norm`` is the norm whose gamma precedes it."""
    name: str
    stage: int          # 0 = stem, 1.. = backbone stages, num_stages + 1 = head
    norm: nn.Module
    channels: int
    total: torch.Tensor = None    # per-channel sum of activations
    zeros: torch.Tensor = None    # per-channel count of exact zeros
    count: int = 0                # elements per channel seen

    def add(self, act):
        a = act.detach().to(torch.float64).transpose(0, 1).reshape(self.channels, -1)
        if self.total is None:
            self.total = torch.zeros(self.channels, dtype=torch.float64)
            self.zeros = torch.zeros(self.channels, dtype=torch.float64)
        self.total += a.sum(1).cpu()
        self.zeros += (a == 0).sum(1).cpu()
        self.count += a.shape[1]

    def magnitudes(self):
        return self.total / max(self.count, 1)

    def zero_fraction(self):
        return self.zeros / max(self.count, 1)

    def gamma(self):
        return self.norm.weight.detach().to(torch.float64).cpu()


@dataclass
class BlockStat:
    """Running sums of one plug-in's (or WE conv's) statistics; :meth:`summary` turns them into numbers."""
    name: str
    kind: str
    module: nn.Module
    sums: dict = field(default_factory=dict)

    def add(self, key, value):
        self.sums[key] = self.sums.get(key, 0) + value


def _stage_map(model):
    """Module name -> stage, from the backbone's own ``stem_and_stages()`` (0: the stem); what follows the last
    stage in its container (MobileNetV2's last conv) counts as one stage more."""
    names = {id(m): n for n, m in model.named_modules()}
    parts = model.stem_and_stages()
    stages = {names[id(m)]: k for k, part in enumerate(parts) for m in part}
    parent, _, last = names[id(parts[-1][-1])].rpartition(".")
    siblings = [n for n, _ in (model.get_submodule(parent) if parent else model).named_children()]
    for n in siblings[siblings.index(last) + 1:]:
        stages[f"{parent}.{n}" if parent else n] = len(parts)
    return stages


def stage_of(name, stage_map):
    for prefix, stage in stage_map.items():
        if name == prefix or name.startswith(prefix + "."):
            return stage
    return 0


class ChannelProbe:
    """Hooks on ``model``'s sites and blocks; run images through the model, then read :attr:`sites`/:attr:`blocks`."""

    def __init__(self, model):
        self.model = model
        self.sites, self.blocks, self._handles = [], [], []
        stage_map = _stage_map(model)
        modules = dict(model.named_modules())
        if isinstance(modules.get("relu"), nn.ReLU) and isinstance(modules.get("bn1"), nn.BatchNorm2d):
            self._site("stem", 0, modules["relu"], modules["bn1"])
        for name, m in modules.items():
            stage = stage_of(name, stage_map)
            if isinstance(m, ResidualBlock):
                inner = ("bn1", "bn2") if isinstance(m, Bottleneck) else ("bn1",)
                for bn in inner:
                    self._site(f"{name}.{bn}", stage, getattr(m, bn), getattr(m, bn), relu=True)
                last = m.last_norm
                self._site(f"{name}.out", stage, m, last)
                self._branch_hooks(name, m, last)
            elif isinstance(m, ConvNormAct):
                self._site(name, stage, m, m[1])
            if isinstance(m, (CE, SE, WEConv2d)):
                self._block(name, m)

    # ------------------------------------------------------------------ hooks
    def _site(self, name, stage, module, norm, relu=False):
        site = Site(name, stage, norm, norm.num_features)
        self.sites.append(site)

        def hook(_m, _inputs, output):
            site.add(F.relu(output) if relu else output)
        self._handles.append(module.register_forward_hook(hook))

    def _block(self, name, m):
        kind = {CE: "ce", SE: "se", WEConv2d: "we"}[type(m)]
        stat = BlockStat(name, kind, m)
        self.blocks.append(stat)
        if kind == "ce":
            self._handles.append(m.register_forward_hook(lambda _m, inputs, _o: _ce_gains(stat, inputs[0])))
        elif kind == "se":
            self._handles.append(m.gate.register_forward_hook(lambda _m, _i, out: _gate_sums(stat, out)))

    def _branch_hooks(self, name, block, last_norm):
        """ED paths: their output's norm against the residual branch's (after the after-norm plug-ins)."""
        paths = [getattr(block, p) for p in block.parallel if isinstance(getattr(block, p), ED)]
        if not paths:
            return
        stat = BlockStat(f"{name}.{block.parallel[0]}", "ed", paths[0])
        self.blocks.append(stat)
        branch_end = getattr(block, block.after_norm[-1]) if block.after_norm else last_norm
        self._handles.append(branch_end.register_forward_hook(
            lambda _m, _i, out: stat.add("branch_sq", float(out.detach().double().square().sum()))))
        for path in paths:
            self._handles.append(path.register_forward_hook(
                lambda _m, _i, out: stat.add("path_sq", float(out.detach().double().square().sum()))))

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ results
    def block_summaries(self):
        return [dict(name=s.name, kind=s.kind, **_summary(s)) for s in self.blocks]


def _ce_gains(stat, x):
    """CE in eval: per-sample IR gains (1 - sigmoid(theta)) * y / s, as the block computes them."""
    ce = stat.module
    hw = x.shape[2] * x.shape[3]
    var = x.detach().float().flatten(2).var(2, unbiased=hw > 1)
    a = torch.sigmoid(ce.theta.detach().float())
    gains = ((1 - a) * ce.ir.gains(var.to(ce.ir.fc1.weight.dtype)).float() / ce.ir.running_scale.float()).double()
    stat.add("n", gains.shape[0])
    stat.add("gain_sum", gains.sum(0).cpu())
    stat.add("within_std_sum", float(gains.std(1).sum()) if gains.shape[1] > 1 else 0.0)


def _gate_sums(stat, gate):
    g = gate.detach().double().flatten(1)
    stat.add("n", g.shape[0])
    stat.add("gate_sum", g.sum(0).cpu())


def _spread(per_channel):
    return {"mean": float(per_channel.mean()), "std_over_channels": float(per_channel.std(unbiased=False)),
            "min": float(per_channel.min()), "max": float(per_channel.max())}


def _summary(stat):
    m, s = stat.module, stat.sums
    if stat.kind == "ce":
        out = {"sigmoid_theta": float(torch.sigmoid(m.theta.detach()).item()), "groups": m.num_groups,
               "group_channels": m.group_channels}
        if s.get("n"):
            out["ir_gain"] = _spread(s["gain_sum"] / s["n"])
            out["ir_gain"]["within_sample_std"] = s["within_std_sum"] / s["n"]
        return out
    if stat.kind == "se":
        return {"gate": _spread(s["gate_sum"] / s["n"])} if s.get("n") else {}
    if stat.kind == "ed":
        if not s.get("branch_sq"):
            return {}
        return {"path_to_branch_norm": (s.get("path_sq", 0.0) / s["branch_sq"]) ** 0.5}
    return _we_summary(m)


@torch.no_grad()
def _we_summary(conv):
    """LWE gates and MWE magnitude of a weight-excited conv (functions of its parameters only)."""
    from blocks.we import standardize_weight
    w = conv.weight.detach()
    if conv.use_ws:
        w = standardize_weight(w, conv.ws_eps)
    out = {"lwe": conv.use_lwe, "mwe": conv.use_mwe}
    gate = None
    if conv.lwe is not None:   # in the parameters' dtype, as the conv computes it
        gate = conv.lwe(w).double()
        out["lwe_gate"] = _spread(gate.flatten())
    if conv.use_mwe:   # W' = M artanh(U / M), M = (1 + margin) max|U|: the per-weight gain W'/U >= 1
        u = w.double() * gate if gate is not None else w.double()
        big_m = (1 + conv.mwe_margin) * u.abs().max()
        gain = torch.where(u != 0, torch.atanh(u / big_m) * big_m / u.where(u != 0, 1.0), 1.0)
        out["mwe_magnitude"] = {"M": float(big_m), "mean_abs_u_over_M": float((u.abs() / big_m).mean()),
                                "gain": _spread(gain.flatten())}
    return out
