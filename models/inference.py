"""The inference form of a model: ``to_inference(model)`` (docs/deployment.md explains it).

A copy of the model in eval mode where every module offering ``deploy()`` (WE convs, CE, ED; see
``blocks.fusion``) is replaced by what it returns, and every BatchNorm2d fed only by a conv is folded
into that conv (the BN becomes ``nn.Identity``). Which BN follows which conv is read from the
model's dataflow (a torch.fx trace with the blocks as leaves), not guessed from module order; a
pair is folded only where exact: the conv's output goes to that BN alone and both run once.
Module names and the model's class stay, so ``forward_features`` etc. still work; the copy
computes the eval model's outputs up to float rounding (``relative_error``; tests/test_deploy.py).
"""
import collections
import copy
import warnings

import torch
import torch.fx
import torch.nn as nn

from blocks.fusion import fold_bn, swap_modules

__all__ = ["to_inference", "deploy_blocks", "fold_conv_bn", "relative_error"]


def relative_error(out, ref):
    """max |out - ref| / max |ref| (float64), the figure tools.deploy prints.

    Several outputs (a features-only model's dict of maps, a runtime's list) give the worst map's
    error, each map against its own scale; a missing output or another shape is ``inf``."""
    out, ref = [list(v.values()) if isinstance(v, dict) else v for v in (out, ref)]
    if isinstance(out, (list, tuple)) or isinstance(ref, (list, tuple)):
        if not (isinstance(out, (list, tuple)) and isinstance(ref, (list, tuple)) and len(out) == len(ref)):
            return float("inf")
        return max(relative_error(o, r) for o, r in zip(out, ref))
    if out.shape != ref.shape:
        return float("inf")
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def deploy_blocks(model):
    """Replace (in place) every submodule that has ``deploy()`` by its inference form; returns the counts."""
    def deployed(module):
        if not callable(getattr(module, "deploy", None)):
            return None
        new = module.deploy()
        if getattr(module, "_blocklab_plugin", False):
            new._blocklab_plugin = module._blocklab_plugin  # still the config entry's block
        return new
    return swap_modules(model, deployed)


class _BlockLeafTracer(torch.fx.Tracer):
    """Traces the backbone's dataflow; plug-in blocks and their inference forms stay opaque leaves."""

    def is_leaf_module(self, m, qualname):
        return getattr(m, "_blocklab_plugin", False) or super().is_leaf_module(m, qualname)


def _set(model, qualname, module):
    parent, _, name = qualname.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def fold_conv_bn(model):
    """Fold (in place) each eval BatchNorm2d into the Conv2d / ConvTranspose2d that alone feeds it.

    Returns the number of folded pairs. A model whose forward torch.fx cannot trace is left as it is
    (with a warning): folding BNs found by module order alone could fold a BN that is not the conv's.
    """
    try:
        graph = _BlockLeafTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 -- any trace failure means "do not fold", said in the warning
        warnings.warn(f"to_inference: BatchNorm not folded, torch.fx cannot trace {type(model).__name__} "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        return 0
    modules = dict(model.named_modules(remove_duplicate=False))
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if type(bn) is not nn.BatchNorm2d or bn.training or bn.running_var is None:
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        conv = modules.get(src.target) if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
        if type(conv) not in (nn.Conv2d, nn.ConvTranspose2d) or len(src.users) != 1 or src.kwargs:
            continue
        if calls[src.target] != 1 or calls[node.target] != 1 or conv.out_channels != bn.num_features:
            continue
        if sum(m is conv for m in modules.values()) != 1 or sum(m is bn for m in modules.values()) != 1:
            continue  # registered under two names: it may run elsewhere too
        pairs.append((src.target, node.target, conv, bn))
    for conv_name, bn_name, conv, bn in pairs:
        _set(model, conv_name, fold_bn(conv, bn))
        _set(model, bn_name, nn.Identity())
    return len(pairs)


def to_inference(model, fold_bn=True):
    """A new model in its inference form (eval mode, no gradients); ``model`` itself is left untouched.

    WE convs become plain convs, CE/ED their ``deploy()`` forms, and (``fold_bn``) every BatchNorm2d
    fed by a conv alone is folded into it. ``model.inference_summary`` says what was replaced.
    """
    was_training = model.training
    model.eval()
    try:
        out = copy.deepcopy(model)
    finally:
        model.train(was_training)
    out.eval().requires_grad_(False)
    with torch.no_grad():
        if callable(getattr(out, "deploy", None)):
            return out.deploy()
        counts = deploy_blocks(out)
        folded = fold_conv_bn(out) if fold_bn else 0
    out.eval()
    out.inference_summary = dict(counts, conv_bn_folded=folded)
    return out
