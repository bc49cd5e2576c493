"""``benchmarks.benchmark --check`` and ``--graph-breaks``: the fast paths must not change results.

--check, per registered block (on a random activation) and per model of the run:
* low precision (bf16 autocast, or fp16 with --precision fp16) vs float32: relative error
  ||y_low - y_fp32|| / ||y_fp32|| of each block's output, train and eval mode, must be <= 1e-2
  (the float32 run gets the same, already rounded input, so only the block's own error counts);
  for whole models (eval mode) the error is reported, not judged: at random init it
  compounds over dozens of layers (and, in train mode, BatchNorm over a few 1x1 maps
  amplifies it to O(1) even in plain MobileNetV2), so it says little about any one block;
* channels_last vs contiguous, float32, eval mode: <= 1e-5 (blocks and models);
* WE models: the folded model (``blocks.we.fold_we``) vs the WE model in eval mode: <= 1e-5;
* with --compile: compiled vs eager, float32, eval mode: <= 1e-4;
* ``--check-steps`` training steps on a fixed synthetic batch in the low precision (and
  --channels-last / --compile): every loss and, at the end, every parameter finite.
The low precision is --precision when that is bf16 or fp16, else bf16.
--graph-breaks: ``torch._dynamo.explain`` on each model's forward in train and eval mode, under
--precision autocast and --channels-last as the timed steps run it; lists each break's reason
and the line it comes from.
"""
import copy
import math
import os

import torch

from benchmarks import harness as bu

LOW_TOL, CL_TOL, FOLD_TOL, COMPILE_TOL = 1e-2, 1e-5, 1e-5, 1e-4


def relerr(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def block_samples():
    """(name, module, input) for every registered block and conv type other than 'plain'."""
    import blocks
    out = []
    for name, cls in sorted(blocks.BLOCKS.items()):
        out.append((f"block:{name}", lambda cls=cls: cls(256), (4, 256, 14, 14)))
    for name, cls in sorted(blocks.CONVS.items()):
        if name != "plain":
            out.append((f"conv:{name}", lambda cls=cls: cls(64, 64, 3, padding=1), (4, 64, 14, 14)))
    return out


def _row(model, check, value, tol, note=""):
    ok = value is not None and math.isfinite(value) and (tol is None or value <= tol)
    return {"model": model, "check": check, "value": value, "tol": tol, "ok": ok, "note": note}


def _outputs(module, x, device, precision=None, train=False):
    module.train(train)
    with torch.no_grad(), bu.autocast(device, precision or "fp32"):
        return module(x).float()


def check_blocks(device, low):
    rows = []
    dtype = bu.LOW_DTYPES[low]
    for name, make, shape in block_samples():
        try:
            torch.manual_seed(0)
            ref = make().to(device)
            x = torch.randn(*shape, device=device).to(dtype).float()  # representable in `low`
            for train in (True, False):
                tag = "train" if train else "eval"
                a, b = copy.deepcopy(ref), copy.deepcopy(ref)
                y32 = _outputs(a, x, device, train=train)
                ylow = _outputs(b, x.to(dtype), device, low, train=train)
                rows.append(_row(name, f"{low} vs fp32 ({tag})", relerr(ylow, y32), LOW_TOL))
            a, b = copy.deepcopy(ref), copy.deepcopy(ref).to(memory_format=torch.channels_last)
            y = _outputs(a, x, device)
            ycl = _outputs(b, x.contiguous(memory_format=torch.channels_last), device)
            rows.append(_row(name, "channels_last vs contiguous", relerr(ycl, y), CL_TOL))
        except Exception as exc:  # a block that cannot even run fails its row
            rows.append(_row(name, "runs", None, None, f"{type(exc).__name__}: {exc}"))
    return rows


def check_model(e, args, device, low):
    rows, model = [], e.model
    x, y = bu.synthetic_batch(args.batch_size, e.input_size, e.num_classes, device, False)
    xcl = x.contiguous(memory_format=torch.channels_last)
    ref = _outputs(model, x, device)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    rows.append(_row(e.name, "channels_last vs contiguous", relerr(_outputs(cl, xcl, device), ref), CL_TOL))
    del cl
    rel = relerr(_outputs(model, x, device, low), ref)
    rows.append(_row(e.name, f"{low} vs fp32 (eval, whole model)", rel, None, "reported, not judged"))
    if bu.is_we(model):
        from blocks.we import fold_we
        folded = fold_we(copy.deepcopy(model))
        rows.append(_row(e.name, "WE folded vs unfolded", relerr(_outputs(folded, x, device), ref), FOLD_TOL))
    net = model
    if args.compile:
        net = torch.compile(model, mode=args.compile_mode)
        rows.append(_row(e.name, "compiled vs eager", relerr(_outputs(net, x, device), ref), COMPILE_TOL))
    steps = args.check_steps or (200 if device.type == "cuda" else 5)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()
    step = bu.train_step_fn(net, bu.make_optimizer(model, args.batch_size), device, low)
    losses = [step(x, y).item() for _ in range(steps)]
    finite = all(math.isfinite(v) for v in losses) and all(torch.isfinite(p).all() for p in model.parameters())
    note = f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if finite else f"non-finite after {losses}"
    rows.append({"model": e.name, "check": f"{steps} train steps ({low}) finite", "value": None,
                 "tol": None, "ok": finite, "note": note})
    return rows


def run_checks(entries, args, device):
    low = args.precision if args.precision in bu.LOW_DTYPES else "bf16"
    rows = check_blocks(device, low)
    for e in entries:
        try:
            rows += check_model(e, args, device, low)
        except Exception as exc:
            rows.append(_row(e.name, "runs", None, None, f"{type(exc).__name__}: {exc}"))
    return rows


def check_table(rows):
    out = ["| model / block | check | value | tolerance | ok | note |", "|---|---|---:|---:|---|---|"]
    for r in rows:
        v = "-" if r["value"] is None else f"{r['value']:.2e}"
        t = "-" if r["tol"] is None else f"{r['tol']:.0e}"
        out.append(f"| {r['model']} | {r['check']} | {v} | {t} | {'yes' if r['ok'] else 'NO'} | {r['note']} |")
    return "\n".join(out)


def _where(reason):
    stack = getattr(reason, "user_stack", None) or []
    for frame in reversed(stack):
        if "site-packages" not in frame.filename and "/torch/" not in frame.filename:
            return f"{os.path.relpath(frame.filename)}:{frame.lineno}"
    return f"{os.path.relpath(stack[-1].filename)}:{stack[-1].lineno}" if stack else "?"


def graph_breaks(entries, args, device):
    """Graph count, break count and deduplicated break reasons of each model's forward."""
    import torch._dynamo
    rows = []
    for e in entries:
        model = e.model.to(memory_format=torch.channels_last) if args.channels_last else e.model
        x, _ = bu.synthetic_batch(min(args.batch_size, 8), e.input_size, e.num_classes, device,
                                  args.channels_last)
        for mode in ("train", "eval"):
            model.train(mode == "train")
            torch._dynamo.reset()
            try:
                with bu.autocast(device, args.precision):
                    ex = torch._dynamo.explain(model)(x)
            except Exception as exc:
                rows.append({"model": e.name, "mode": mode, "ok": False, "graphs": None, "breaks": None,
                             "reasons": [f"explain failed: {type(exc).__name__}: {exc}"]})
                continue
            reasons = sorted({f"{br.reason.strip().splitlines()[0]} @ {_where(br)}" for br in ex.break_reasons})
            breaks = max(ex.graph_break_count, len(reasons))  # explain can list a reason it did not count
            rows.append({"model": e.name, "mode": mode, "graphs": ex.graph_count,
                         "breaks": breaks, "reasons": reasons, "ok": breaks == 0})
    torch._dynamo.reset()
    return rows


def breaks_table(rows):
    out = ["| model | mode | graphs | graph breaks | reasons |", "|---|---|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['mode']} | {r['graphs']} | {r['breaks']} | "
                   f"{'; '.join(r['reasons']) or '-'} |")
    return "\n".join(out)
