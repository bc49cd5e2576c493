"""Pieces of ``benchmarks/benchmark.py``: devices and their peaks, precision switches, the timed steps.

Kept apart so the benchmark's command line stays short and ``benchmarks/checks.py`` (the
``--check`` / ``--graph-breaks`` modes) can share the same step definitions.
"""
import contextlib
import copy
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

_BF16_SXM = {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12}
# Dense (no 2:4 sparsity) tensor-core peaks in FLOP/s from NVIDIA's datasheets, matched by a
# substring of torch.cuda.get_device_name(); the first match wins, so variants come first.
# "fp32" is the non-tensor-core peak (what --precision fp32 can use). --peak-tflops overrides.
PEAK_FLOPS = (
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H200 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H100", _BF16_SXM),   # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", _BF16_SXM),   # H200 SXM: same compute as H100 SXM, more and faster memory
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 366e12, "fp16": 366e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
)


def peak_for_name(name, precision):
    """Datasheet peak FLOP/s of the card called ``name`` at ``precision``; None if not listed."""
    for key, peaks in PEAK_FLOPS:
        if key in name:
            return peaks.get(precision)
    return None


def peak_flops(device, precision):
    """Peak FLOP/s of ``device`` at ``precision``; None on CPU or an unknown card."""
    return peak_for_name(torch.cuda.get_device_name(device), precision) if device.type == "cuda" else None


def device_info(device):
    info = {"type": device.type, "name": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gb=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count)
    else:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                info["name"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return info


def versions():
    import torchvision
    out = {"python": sys.version.split()[0], "torch": torch.__version__,
           "torchvision": torchvision.__version__, "platform": platform.platform()}
    if torch.cuda.is_available():
        out.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return out


def set_precision(precision, device):
    """Global math switches: TF32 only for 'tf32'; fp32/bf16/fp16 keep float32 math exact."""
    tf32 = precision == "tf32"
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True


def autocast(device, precision):
    """The autocast context of ``precision`` (a null context for fp32/tf32)."""
    if precision in LOW_DTYPES:
        return torch.autocast(device.type, dtype=LOW_DTYPES[precision])
    return contextlib.nullcontext()


def is_we(model):
    """Whether ``model`` has weight-excited convs (which ``blocks.we.fold_we`` can fold)."""
    return any(type(m).__name__ == "WEConv2d" for m in model.modules())


def forward_gmacs(model, input_size, batch_size):
    """(GMACs of one image, GMACs of a forward of the whole batch), eval mode, on the CPU model.

    The first is ``tools.flops.complexity``'s figure. The batch figure is f(1) + (B - 1)(f(2) - f(1)).
    WE is counted folded (0 excitation work): an inference step runs none either, as WEConv2d caches
    its excited weight in eval without autograd. Training steps: :func:`train_step_flops`.
    """
    from analysis.flops import complexity
    _, one = complexity(model, input_size)
    _, two = complexity(_Twice(model), input_size)
    return one, one + (batch_size - 1) * (two - one)


def train_step_flops(model, input_size, batch_size):
    """FLOPs one training step executes: train-mode forward + cross-entropy + backward of the batch.

    Counted by ``torch.utils.flop_counter`` on the unfolded model in train mode, so it includes what
    an eval-mode count of the folded model misses: CE's batch statistics (per-sample Gram matrices,
    Newton iterations) and their gradients, WE's weight excitation and its backward (once per step,
    not per image), and the real backward (the stem has no input gradient). Counted at batches 2
    and 4 and extended linearly to ``batch_size``: every count is affine in the batch size.
    """
    from torch.utils.flop_counter import FlopCounterMode
    net = copy.deepcopy(model).train()
    gen = torch.Generator().manual_seed(0)

    def count(b):
        x = torch.randn(b, 3, input_size, input_size, generator=gen)
        with FlopCounterMode(display=False) as counter:
            logits = net(x)
            F.cross_entropy(logits, torch.zeros(b, dtype=torch.long)).backward()
        return counter.get_total_flops()

    two, four = count(2), count(4)
    return two + (batch_size - 2) * (four - two) / 2


class _Twice(torch.nn.Module):
    """``model`` on a batch of two copies of its input (so ``complexity`` counts a batch of 2)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.cat([x, x]))


def synthetic_batch(batch_size, input_size, num_classes, device, channels_last, seed=0):
    """A fixed random batch made on the device (the input pipeline is not measured)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch_size, 3, input_size, input_size, device=device, generator=gen)
    y = torch.randint(0, num_classes, (batch_size,), device=device, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def make_optimizer(model, batch_size):
    """SGD with the ImageNet recipe's momentum and weight decay; lr by the linear scaling rule."""
    return torch.optim.SGD(model.parameters(), lr=0.1 * batch_size / 256, momentum=0.9, weight_decay=1e-4)


def train_step_fn(model, optimizer, device, precision):
    """One training step: zero_grad(set_to_none) + forward + cross-entropy + backward + SGD step."""
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return loss
    return step


def infer_step_fn(model, device, precision):
    """One inference step: forward in eval mode under no_grad."""
    def step(x, y=None):
        with torch.no_grad(), autocast(device, precision):
            return model(x)
    return step


def time_steps(step, x, y, n, device):
    """Run ``step`` n times; per-step seconds (CUDA events, no sync between steps; perf_counter on CPU)."""
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        events[0].record()
        for i in range(n):
            step(x, y)
            events[i + 1].record()
        torch.cuda.synchronize(device)
        return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(n)]
    stamps = [time.perf_counter()]
    for _ in range(n):
        step(x, y)
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def state_bytes(*objs):
    """Bytes of the tensors a model (params, grads, buffers) or optimizer (state) keeps on its device."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for obj in objs:
        if isinstance(obj, torch.optim.Optimizer):
            for st in obj.state.values():
                for v in st.values():
                    add(v)
        elif isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                add(p)
                add(p.grad)
            for b in obj.buffers():
                add(b)
        else:
            add(obj)
    return total


class MemoryProbe:
    """Peak device memory of one model's steps while other models stay resident.

    peak = max_allocated during the steps - (allocated before - this model's own state),
    i.e. what the model would need on its own (allocator caching not counted). CPU: None.
    """

    def __init__(self, device, *own):
        self.device, self.own = device, own

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            self.others = torch.cuda.memory_allocated(self.device) - state_bytes(*self.own)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        self.peak = None
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.others
        return False


def summarize(times):
    """Median / mean / min / max of per-step seconds (median is what the tables report)."""
    return {"median": statistics.median(times), "mean": statistics.fmean(times),
            "min": min(times), "max": max(times), "n": len(times)}


class Job:
    """One (model, mode) pair to time: its step function and what it measured."""

    def __init__(self, entry, mode, step, optimizer=None, compiled=False):
        self.entry, self.mode, self.step, self.optimizer = entry, mode, step, optimizer
        self.name = entry.name + ("+compiled" if compiled else "")
        self.times, self.peak, self.warmup_s, self.error = [], None, None, None

    def _run(self, fn):
        try:
            self.entry.model.train(self.mode == "train")
            return fn()
        except Exception as exc:  # e.g. out of memory or a compile failure: report, go on
            msg = str(exc).strip()
            self.error = f"{type(exc).__name__}: {msg.splitlines()[0] if msg else ''}"
            print(f"[{self.name} {self.mode}] failed: {self.error}", file=sys.stderr)

    def warm_up(self, batch, n, device):
        def steps():
            for _ in range(max(n, 1)):
                self.step(*batch)
            sync(device)
        t0 = time.perf_counter()
        self._run(steps)
        self.warmup_s = time.perf_counter() - t0
        if not self.error:
            print(f"[{self.name} {self.mode}] warm-up {self.warmup_s:.1f}s", file=sys.stderr)

    def measure(self, batch, n, device):
        with MemoryProbe(device, self.entry.model, self.optimizer) as probe:
            times = self._run(lambda: time_steps(self.step, *batch, n, device))
        if times:
            self.times += times
            self.peak = max(self.peak or 0, probe.peak or 0) or None


def time_models(entries, args, device):
    """Warm up every (model, mode), then time them in ``args.repeats`` interleaved rounds; result rows."""
    modes = ["train", "infer"] if args.mode == "both" else [args.mode]
    jobs = []
    for e in entries:
        for compiled in args.compile_variants:  # eager and compiled share the module's parameters
            net = torch.compile(e.model, mode=args.compile_mode) if compiled else e.model
            if "train" in modes and not e.infer_only:
                opt = make_optimizer(e.model, args.batch_size)
                jobs.append(Job(e, "train", train_step_fn(net, opt, device, args.precision), opt, compiled))
            if "infer" in modes:
                jobs.append(Job(e, "infer", infer_step_fn(net, device, args.precision), None, compiled))
    batches = {}
    for e in entries:
        key = (args.batch_size, e.input_size, e.num_classes)
        if key not in batches:
            batches[key] = synthetic_batch(*key, device, args.channels_last, seed=args.seed)
        e.batch = batches[key]
    for job in jobs:
        job.warm_up(job.entry.batch, args.warmup, device)
    for r in range(args.repeats):
        for job in jobs:
            if not job.error:
                job.measure(job.entry.batch, args.steps, device)
        print(f"round {r + 1}/{args.repeats} done", file=sys.stderr)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device, args.precision)
    rows = []
    for job in jobs:
        e = job.entry
        row = {"model": job.name, "mode": job.mode, "params_m": e.params / 1e6, "gmacs_1img": e.gmacs,
               "gmacs": e.step_gmacs / args.batch_size, "batch_size": args.batch_size,
               "input_size": e.input_size}
        if job.error or not job.times:
            row["error"] = job.error or "no steps timed"
            rows.append(row)
            continue
        st = summarize(job.times)
        flops = e.train_flops if job.mode == "train" else 2 * e.step_gmacs * 1e9
        row.update(step_gflops=flops / 1e9, step_ms=st["median"] * 1e3, step_ms_mean=st["mean"] * 1e3, step_ms_min=st["min"] * 1e3,
                   step_ms_max=st["max"] * 1e3, n_steps=st["n"], images_per_s=args.batch_size / st["median"],
                   tflops=flops / st["median"] / 1e12, mfu=flops / st["median"] / peak if peak else None,
                   peak_mem_mb=job.peak / 2**20 if job.peak else None, warmup_s=job.warmup_s)
        rows.append(row)
    for mode in modes:  # ratios to the baseline of the same mode (and compiled to compiled)
        ok = {r["model"]: r for r in rows if r["mode"] == mode and "error" not in r}
        for r in ok.values():
            suffix = "+compiled" if r["model"].endswith("+compiled") else ""
            name = args.baseline or entries[0].name
            base = ok.get(name + suffix) or ok.get(name) or next(iter(ok.values()))
            r["ratio"], r["baseline"] = r["images_per_s"] / base["images_per_s"], base["model"]
    return rows


def results_table(rows):
    """Markdown table of result rows ('-' where a value does not apply, e.g. MFU on CPU)."""
    def f(v, fmt, scale=1, unit=""):
        return "-" if v is None else format(v * scale, fmt) + unit
    out = ["| model | mode | params (M) | GMACs/img | step (ms) | min (ms) | img/s | vs base | TFLOP/s | MFU "
           "| peak mem (MiB) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['model']} | {r['mode']} | {f(r['params_m'], '.2f')} | {f(r['gmacs'], '.2f')} |"
        if "error" in r:
            out.append(f"{head} failed: {r['error'][:100]} | | | | | | |")
            continue
        out.append(f"{head} {r['step_ms']:.1f} | {r['step_ms_min']:.1f} | {r['images_per_s']:.1f} | {r['ratio']:.3f} | "
                   f"{r['tflops']:.3f} | {f(r['mfu'], '.1f', 100, '%')} | {f(r['peak_mem_mb'], '.0f')} |")
    return "\n".join(out)


def write_report(text, out=None):
    """Print a benchmark's markdown report and, with ``out``, write it there (folders made as needed)."""
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
