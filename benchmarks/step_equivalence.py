"""Three SGD steps of an original repository's training loop against three steps of our Trainer.

    python -m benchmarks.step_equivalence --cenet /tmp/CENet --ednet /tmp/ED-Net --we /tmp/WE \\
        [--steps 3] [--batch 4] [--size 64] [--out docs/step_equivalence.md]

Each original is read from a checkout the user gives (nothing of it is stored here) and
run as its own code runs: its model class and init, its criterion, its optimizer
construction and its LR law, in float64. Both sides start from the same weights (the
original's, converted with ``models.converters``) and see the same batches: fixed
post-augmentation tensors, so augmentation is not part of the comparison (the recipe
tests check its constants). Our side is ``engine.trainer.Trainer`` built from the
reproduction config, with its data loader replaced by those batches.

Run-time patches to the originals (in memory only): CENet's CE clones its expanded
``running_wm`` buffer and drops a debug print (as ``benchmarks/bench_ce.py``); CENet's
and ED-Net's fixed ``AvgPool2d(7)`` becomes a global average (the same at 224); at input
sizes where ED-Net's hard-coded stage-4 ``output_padding=0`` does not restore the
shortcut's size (e.g. 64), it is set so that it does (our decoder sizes its output to its input).

Reported per repository: the largest relative error over parameters of the weights after
the steps, ||ours - theirs|| / ||theirs||, and of the updates, ||dw_ours - dw_theirs|| /
||dw_theirs||, and the same for buffers (running statistics).
"""
import argparse
import importlib.util
import os
import re
import sys
import tempfile
import types

import torch
import torch.nn as nn
import yaml

from engine.config import load_config
from engine.trainer import Trainer
from models import build_model
from models.weights import convert_state_dict

CONFIGS = {"cenet": "configs/imagenet/cenet/ce_resnet50.yaml",
           "ednet": "configs/imagenet/ednet/ed_resnet50.yaml",
           "we": "configs/imagenet/we/werepo_l_resnet50.yaml"}


def _exec_file(path, name):
    """A module of the original repository, loaded from its file without importing its package."""
    module = types.ModuleType(name)
    module.__file__ = path
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), module.__dict__)
    return module


def _class_from(path, class_name, namespace):
    """One class definition cut from a script that cannot be imported (CENet's train_imagenet.py parses argv
    at import and uses ``async`` as a keyword argument, a syntax error since Python 3.7)."""
    with open(path) as f:
        lines = f.read().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(f"class {class_name}"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i][:1] not in ("", " ", "\t")), len(lines))
    exec(compile("\n".join(lines[start:end]), path, "exec"), namespace)
    return namespace[class_name]


# ----------------------------------------------------------------------------- the originals

def cenet(root, ipe):
    """resnetv1ce50() (imagenet/models/resnet_v1_ce.py) and train_imagenet.py's step."""
    from benchmarks.bench_ce import load_original
    ops = types.ModuleType("devkit.ops")
    ops.CE, ops.SwitchNorm2d = load_original(root), None
    saved = {k: sys.modules.get(k) for k in ("devkit", "devkit.ops")}
    sys.modules.update({"devkit": types.ModuleType("devkit"), "devkit.ops": ops})
    try:
        models = _exec_file(os.path.join(root, "imagenet", "models", "resnet_v1_ce.py"), "cenet_resnet_v1_ce")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    model = models.resnetv1ce50()                                  # train_imagenet.py:77
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    criterion = _class_from(os.path.join(root, "imagenet", "train_imagenet.py"), "LabelSmoothingLoss",
                            {"torch": torch, "nn": nn})(1000, smoothing=0.1)   # train_imagenet.py:84
    with open(os.path.join(root, "imagenet", "configs", "config_resnetv1ce50_step_moving_average.yaml")) as f:
        args = types.SimpleNamespace(**yaml.safe_load(f)["TRAIN"])
    sched_cls = _exec_file(os.path.join(root, "devkit", "core", "lr_scheduler.py"), "cenet_lr").LRScheduler

    def make_optimizer(m):                                         # train_imagenet.py:86-88, 146
        opt = torch.optim.SGD(m.parameters(), args.base_lr, momentum=args.momentum, weight_decay=args.weight_decay)
        sched = sched_cls(opt, ipe, args)
        return opt, lambda i: sched.update(i, 0)                   # train_imagenet.py:185, before the forward
    return model, criterion, make_optimizer


def ednet(root, size):
    """resnet50_ed() (ed_resnet.py) and imagenet_train.py's step at its defaults (lr 0.1, epoch 0)."""
    mod = _exec_file(os.path.join(root, "ed_resnet.py"), "ednet_ed_resnet")
    model = mod.resnet50_ed()
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    s4 = -(-size // 32)                                             # stage-4 size; op=1 restores an even size
    for block in model.layer4:
        block.decoder.decoder_conv.output_padding = (1 - s4 % 2,) * 2

    def make_optimizer(m):                                         # imagenet_train.py:113-115, 343-348
        opt = torch.optim.SGD(m.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
        return opt, lambda i: None                                 # lr 0.1 * 0.1 ** (0 // 30)
    return model, nn.CrossEntropyLoss(), make_optimizer            # imagenet_train.py:112


def we(root):
    """l_resnet50() (models/imagenet/resnet.py, models/layers.py at HEAD) and imagenet.py's step."""
    spec = importlib.util.spec_from_file_location("werepo_models", os.path.join(root, "models", "__init__.py"),
                                                  submodule_search_locations=[os.path.join(root, "models")])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["werepo_models"] = pkg
    spec.loader.exec_module(pkg)
    resnet = importlib.import_module("werepo_models.imagenet.resnet")
    model = resnet.l_resnet50()

    def make_optimizer(m):                                         # imagenet.py:178-179, 404-409 (epoch 0)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        return opt, lambda i: None
    return model, nn.CrossEntropyLoss(), make_optimizer            # imagenet.py:177


def run_original(model, criterion, make_optimizer, batches):
    """The originals' step; float64 as the default dtype (CENet's CE makes its identity with torch.eye())."""
    opt, before_step = make_optimizer(model)
    model.train()
    torch.set_default_dtype(torch.float64)
    try:
        for i, (x, y) in enumerate(batches):
            before_step(i)
            loss = criterion(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_default_dtype(torch.float32)
    return model.state_dict()


# ----------------------------------------------------------------------------- ours

class FixedBatches:
    """Stands in for the Trainer's loader: the same batches, in order, no augmentation."""
    sampler, batch_sampler = None, None

    def __init__(self, batches):
        self.batches, self.batch_size = batches, len(batches[0][1])

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def run_ours(config, model, batches, size, work_dir):
    n, batch = len(batches), len(batches[0][1])
    cfg = load_config(config, [
        "data.dataset=synthetic", "data.root=null", "data.num_classes=null", f"data.input_size={size}",
        "data.eval_resize=null", "data.workers=0", f"data.synthetic.train_size={n * batch}",
        "data.synthetic.val_size=2", "data.synthetic.num_classes=null", f"train.batch_size={batch}",
        "train.accum_steps=1", "train.amp=none", "train.compile=false", "eval.interval=0", "eval.final=false",
        "runtime.device=cpu", f"runtime.max_steps={n}", "runtime.tensorboard=false", "runtime.handle_signals=false",
        f"runtime.work_dir={work_dir}"])
    t = Trainer(cfg, model_fn=lambda _: model)
    assert t.iters_per_epoch == n
    t.train_loader, t.train_tf = FixedBatches(batches), (lambda x: x)
    result = t.train()
    assert result["status"] == "max_steps" and t.step == n, result
    return t.model.state_dict()


# ----------------------------------------------------------------------------- comparison

def _rel(a, b):
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


# buffers a repository updates differently on purpose of its code, reported on their own row
DOUBLE_UPDATED = {"ednet": (r"downsample\.1\.running_(mean|var)$",
                            "shortcut-BN running stats (ED-Net runs its shortcut twice per step)")}


def compare(initial, theirs, ours, param_names, split=None):
    """Largest relative errors of weights and of updates per group of tensors, with the worst key."""
    floats = [k for k in ours if ours[k].is_floating_point()]
    groups = {"params": [k for k in floats if k in param_names],
              "buffers": [k for k in floats if k not in param_names]}
    if split is not None:
        pattern, label = split
        groups[label] = [k for k in groups["buffers"] if re.search(pattern, k)]
        groups["other buffers"] = [k for k in groups["buffers"] if not re.search(pattern, k)]
        del groups["buffers"]
    rows = {}
    for kind, keys in groups.items():
        w = max(((_rel(ours[k], theirs[k]), k) for k in keys), default=(0.0, "-"))
        d = max(((_rel(ours[k] - initial[k], theirs[k] - initial[k]), k) for k in keys
                 if (theirs[k] - initial[k]).norm() > 0), default=(0.0, "-"))
        rows[kind] = (w, d, len(keys))
    return rows


def check(name, root, args):
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    try:
        if name == "cenet":
            model, criterion, make_optimizer = cenet(root, args.steps)
        elif name == "ednet":
            model, criterion, make_optimizer = ednet(root, args.size)
        else:
            model, criterion, make_optimizer = we(root)
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.double()
    ours = build_model(load_config(CONFIGS[name]).model).double()
    start, source = convert_state_dict(model.state_dict(), ours)
    ours.load_state_dict(start, strict=True)
    initial = {k: v.clone() for k, v in ours.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, 3, args.size, args.size, generator=g, dtype=torch.float64),
                torch.randint(0, 1000, (args.batch,), generator=g)) for _ in range(args.steps)]
    theirs_sd = run_original(model, criterion, make_optimizer, batches)
    theirs, _ = convert_state_dict(theirs_sd, ours, source)
    with tempfile.TemporaryDirectory(prefix="step_equiv_") as work_dir:
        ours_sd = run_ours(CONFIGS[name], ours, batches, args.size, work_dir)
    return compare(initial, theirs, ours_sd, {k for k, _ in ours.named_parameters()}, DOUBLE_UPDATED.get(name))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cenet", help="Tangshitao/CENet checkout")
    ap.add_argument("--ednet", help="megvii-research/ED-Net checkout")
    ap.add_argument("--we", help="Ridwan230/pytorch-classification-weight-excitation checkout")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=64, help="input size, a multiple of 32")
    ap.add_argument("--out", help="also write the table to this Markdown file")
    args = ap.parse_args(argv)
    roots = {k: getattr(args, k) for k in CONFIGS if getattr(args, k)}
    if not roots:
        ap.error("give at least one of --cenet, --ednet, --we (a checkout of that repository)")
    if args.size % 32:
        ap.error(f"--size {args.size} is not a multiple of 32")
    for k, root in roots.items():
        if not os.path.isdir(root):
            ap.error(f"--{k} {root}: not a directory")
    lines = [f"`python -m benchmarks.step_equivalence {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"{args.steps} SGD steps, batch {args.batch} at {args.size}x{args.size}, float64.", "",
             "| repository | config | tensors | max rel. error of weights (worst) "
             "| max rel. error of updates (worst) |",
             "|---|---|---|---|---|"]
    for name, root in roots.items():
        for kind, ((w, wk), (d, dk), n) in check(name, root, args).items():
            lines.append(f"| {name} {kind} | `{CONFIGS[name]}` | {n} | {w:.1e} (`{wk}`) | {d:.1e} (`{dk}`) |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
