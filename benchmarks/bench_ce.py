"""CE block speed: blocklab's ``blocks.ce.CE`` against the original CENet module, same inputs.

    python -m benchmarks.bench_ce --original /path/to/CENet [--batch 8] [--repeat 5] [--out FILE]
    python -m benchmarks.bench_ce --layouts [--input-size 224] [--out FILE]   # NCHW vs channels_last, fp32 vs bf16

The original (Tangshitao/CENet ``devkit/ops/CE_module.py``) is read from a checkout given by
``--original`` or ``$CENET_ROOT``; nothing of it is stored here. Its source is patched in memory
only as far as current PyTorch needs (the expanded ``running_wm`` buffer is cloned so its
in-place update works; a debug ``print`` is dropped) and both modules get the same weights.
Timed: one training-mode forward + backward (statistics, running-buffer updates, gradients)
and one eval-mode forward, at the ResNet-50 shapes where the CENet ResNet-50 places CE.
"""
import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from blocks.ce import CE  # noqa: E402

# (name, channels, H=W, group size): the stem CE and the first CE of stages 1-3 of CE-ResNet-50.
SHAPES = (("stem", 64, 112, 64), ("stage1", 256, 56, 16), ("stage2", 512, 28, 16), ("stage3", 1024, 14, 16))
PATCHES = (
    ("torch.eye(num_channels).expand(num_groups, num_channels, num_channels))",
     "torch.eye(num_channels).expand(num_groups, num_channels, num_channels).clone())"),
    ("        print(self.num_channels)\n", ""),
)


def load_original(root):
    """The original ``CE`` class from a CENet checkout, with the runtime patch applied in memory."""
    path = os.path.join(root, "devkit", "ops", "CE_module.py")
    with open(path) as f:
        source = f.read()
    for old, new in PATCHES:
        if old not in source:
            raise SystemExit(f"{path}: expected text not found ({old.strip()!r}); is this the CENet repository?")
        source = source.replace(old, new)
    module = types.ModuleType("cenet_ce_module")
    exec(compile(source, path, "exec"), module.__dict__)
    return module.CE


def copy_weights(orig, ours):
    from models.converters import cenet
    sd = cenet.convert({f"layer1.0.ce.{k}": v for k, v in orig.state_dict().items()})
    ours.load_state_dict({k[len("layer1.0.ce."):]: v for k, v in sd.items()})


def steps(module, x, grad):
    """Callables for one training step (forward + backward) and one eval forward of ``module``."""
    xr = x.detach().clone().requires_grad_()

    def train_step():
        module.train()
        xr.grad = None
        module(xr).backward(grad)

    def eval_step():
        module.eval()
        with torch.no_grad():
            module(x)
    return train_step, eval_step


def timeit(fns, repeat, warmup=2):
    """Median ms of each callable; the callables alternate so load changes hit all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
    return [statistics.median(ts) for ts in times]


def table(orig_cls, batch, repeat):
    """Markdown rows, one per shape, for the current thread count."""
    rows = []
    for name, c, hw, g in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(batch, c, hw, hw)
        grad = torch.randn_like(x)
        ours = CE(c, group_channels=g)
        if orig_cls is not None:
            orig = orig_cls(c, num_channels=g)
            copy_weights(orig, ours)
            (ours_train, ours_eval), (orig_train, orig_eval) = steps(ours, x, grad), steps(orig, x, grad)
            t_ours_train, t_orig_train = timeit([ours_train, orig_train], repeat)
            t_ours_eval, t_orig_eval = timeit([ours_eval, orig_eval], repeat)
            cells = [f"{t_ours_train:.1f}", f"{t_orig_train:.1f}", f"{t_orig_train / t_ours_train:.2f}x",
                     f"{t_ours_eval:.1f}", f"{t_orig_eval:.1f}", f"{t_orig_eval / t_ours_eval:.2f}x"]
        else:
            t_ours_train, t_ours_eval = timeit(list(steps(ours, x, grad)), repeat)
            cells = [f"{t_ours_train:.1f}", "-", "-", f"{t_ours_eval:.1f}", "-", "-"]
        rows.append(f"| {name}: {c}x{hw}x{hw}, G={g} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


LAYOUTS = (("NCHW fp32", torch.contiguous_format, None), ("channels_last fp32", torch.channels_last, None),
           ("NCHW bf16", torch.contiguous_format, torch.bfloat16),
           ("channels_last bf16", torch.channels_last, torch.bfloat16))


def layout_steps(module, x, fmt, dtype, train):
    """One step of ``module`` on ``x`` in memory format ``fmt`` under CPU autocast ``dtype`` (None: off).

    ``train=True`` (a block): backward of a fixed output gradient in ``fmt``, as the layers after a block
    send it in a network of that layout (a loss computed on the block's output would hand back an NCHW
    gradient and time a layout conversion that no network makes); labels (a model): cross-entropy.
    """
    x = x.contiguous(memory_format=fmt)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=fmt)
    amp = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype is not None else contextlib.nullcontext

    def step():
        if train is False:
            module.eval()
            with torch.no_grad(), amp():
                module(x)
            return
        module.train()
        module.zero_grad(set_to_none=True)
        with amp():
            out = module(x)
        if train is True:
            out.backward(grad.to(out.dtype))
        else:
            F.cross_entropy(out.float(), train).backward()
    return step


def layout_table(batch, repeat, input_size):
    """Rows: CE at the CE-ResNet-50 shapes and a CE-ResNet-50 training step, every layout interleaved."""
    from models import build_model
    rows = []
    for name, c, hw, g in SHAPES:
        torch.manual_seed(0)
        x, ce = torch.randn(batch, c, hw, hw), CE(c, group_channels=g)
        for train in (True, False):
            ms = timeit([layout_steps(ce, x, fmt, dt, train) for _, fmt, dt in LAYOUTS], repeat)
            rows.append(f"| CE {name}: {c}x{hw}x{hw}, G={g}, {'train f+b' if train else 'eval'} | "
                        + " | ".join(f"{t:.1f}" for t in ms) + f" | {ms[0] / ms[1]:.2f}x |")
            print(rows[-1], flush=True)
    torch.manual_seed(0)
    model = build_model({"backbone": "resnet50", "plugins": [{"type": "ce", "stages": [1, 2, 3], "stem": True}]})
    x, y = torch.randn(batch, 3, input_size, input_size), torch.randint(0, 1000, (batch,))
    steps_ = []
    for _, fmt, dt in LAYOUTS:
        model.to(memory_format=fmt)  # each step sets the layout of the shared model first
        inner = layout_steps(model, x, fmt, dt, y)
        steps_.append(lambda inner=inner, fmt=fmt: (model.to(memory_format=fmt), inner()))
    ms = timeit(steps_, repeat)
    rows.append(f"| CE-ResNet-50 training step, {input_size}x{input_size} | " + " | ".join(f"{t:.0f}" for t in ms)
                + f" | {ms[0] / ms[1]:.2f}x |")
    print(rows[-1], flush=True)
    return rows


def per_thread(thread_counts, head, rows):
    """One markdown section per torch thread count: a title with the load average, ``head``, ``rows()``."""
    sections = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        title = f"{threads} thread(s), load average {load:.1f} on {os.cpu_count()} cores at start"
        print(f"\n{title}\n{head}")
        sections.append(f"### {title}\n\n{head}\n" + "\n".join(rows()) + "\n")
    return sections


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--original", default=os.environ.get("CENET_ROOT"),
                    help="CENet checkout (default: $CENET_ROOT)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                    help="torch thread counts, one table each (default: as the machine has)")
    ap.add_argument("--out", default=None, help="also write the tables here (markdown)")
    ap.add_argument("--layouts", action="store_true",
                    help="NCHW vs channels_last, fp32 vs bf16 CPU autocast, of CE and a CE-ResNet-50 step")
    ap.add_argument("--input-size", type=int, default=224, help="--layouts: the CE-ResNet-50 input size")
    args = ap.parse_args(argv)
    if args.layouts:
        return layouts_main(args, argv)
    orig_cls = None
    if args.original:
        import warnings
        warnings.filterwarnings("ignore", message=".*baddbmm.*deprecated", category=UserWarning)
        orig_cls = load_original(args.original)
    else:
        print("original CENet not given: timing ours only (git clone https://github.com/Tangshitao/CENet "
              "/tmp/CENet, then pass --original /tmp/CENet or set CENET_ROOT)")
    head = (f"| shape (N={args.batch}) | ours train f+b ms | original train f+b ms | speed-up | "
            "ours eval ms | original eval ms | speed-up |\n|---|---|---|---|---|---|---|")
    sections = per_thread(args.threads, head, lambda: table(orig_cls, args.batch, args.repeat))
    if args.out:
        cmd = "python -m benchmarks.bench_ce " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.out, "w") as f:
            f.write("# CE block, CPU: blocklab vs the original CENet module\n\n")
            f.write(f"Command: `{cmd}`\n\n")
            f.write(f"torch {torch.__version__}, {platform.processor() or platform.machine()}; median of "
                    f"{args.repeat} runs after 2 warm-up, ours and the original alternating; train = forward + "
                    "backward in training mode (batch statistics, running-buffer updates, input and parameter "
                    "gradients), eval = no-grad forward with the running statistics. Each table notes the "
                    "machine's load average: on a shared machine a second thread often waits for a core, "
                    "which costs every parallel op, so the 1-thread table is the steadier comparison.\n\n")
            f.write("\n".join(sections))


def layouts_main(args, argv):
    head = (f"| N={args.batch}, ms (median of {args.repeat}, interleaved) | "
            + " | ".join(name for name, _, _ in LAYOUTS) + " | NCHW / channels_last (fp32) |\n|---|"
            + "---:|" * (len(LAYOUTS) + 1))
    sections = per_thread(args.threads, head, lambda: layout_table(args.batch, args.repeat, args.input_size))
    if args.out:
        cmd = "python -m benchmarks.bench_ce " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.out, "w") as f:
            f.write("# CE block and CE-ResNet-50, CPU: NCHW vs channels_last, fp32 vs bf16 autocast\n\n")
            f.write(f"Command: `{cmd}`\n\ntorch {torch.__version__}, {platform.processor() or platform.machine()}; "
                    "the four variants of a row alternate (2 warm-up rounds, then median). CE train = forward + "
                    "backward in training mode (of a fixed output gradient in the row's layout, as a network "
                    "sends it); eval = no-grad forward; the model step = forward + cross-entropy + backward "
                    "(no optimizer).\n\n")
            f.write("\n".join(sections))


if __name__ == "__main__":
    main()
