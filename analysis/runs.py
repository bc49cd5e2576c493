"""Read training runs from their work directories and put them side by side (``python -m tools.compare``).

Reads only what the trainer already writes into a work directory: the resolved
``config.yaml`` and ``metrics.jsonl``. A run that is unfinished is read as it
stands; a resumed run appends to its ``metrics.jsonl``, and a record logged
again at the same step (the run went back to an earlier checkpoint and did the
step again) replaces the earlier one. :func:`summarize` gives one row per run
(columns in docs/tools.md), :func:`markdown`/:func:`write_csv` the table,
:func:`plot_curves`/:func:`plot_tradeoffs` the figures.
"""
import csv
import json
import math
import os
import statistics
from dataclasses import dataclass, field

import yaml

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
COLUMNS = ("run", "model", "blocks", "params_m", "gflops", "epochs", "planned_epochs", "best_top1", "best_top5",
           "final_top1", "final_top5", "top1_err", "top5_err", "train_img_s", "train_time_s")


class RunError(ValueError):
    """A directory that cannot be compared (one-line reason)."""


@dataclass
class Run:
    work_dir: str
    config: dict
    train: list = field(default_factory=list)   # train records, one per step, by step
    val: list = field(default_factory=list)     # val records, one per step, by step
    skipped_lines: int = 0

    @property
    def steps_per_epoch(self):
        """Optimizer steps per epoch, from the first evaluation (it runs at the end of an epoch)."""
        first = self.val[0]
        return first["step"] / first["epoch"]


def _records(path):
    """metrics.jsonl records keyed by (kind, step), the last written winning; and the unreadable line count."""
    latest, skipped = {}, 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                latest[(rec["kind"], int(rec["step"]))] = rec
            except (ValueError, KeyError, TypeError):
                skipped += 1   # a line cut by a kill mid-write
    return latest, skipped


def read_run(work_dir):
    """Read one run's config and metrics; :class:`RunError` if it is not a run or has no validation yet."""
    if not os.path.isdir(work_dir):
        raise RunError(f"{work_dir}: no such directory; give the work directory of a run (its runtime.work_dir)")
    missing = [f for f in (CONFIG_FILE, METRICS_FILE) if not os.path.isfile(os.path.join(work_dir, f))]
    if missing:
        raise RunError(f"{work_dir} is not a training run (no {' or '.join(missing)}); give the runtime.work_dir "
                       f"of a run started with ./train.sh")
    try:
        with open(os.path.join(work_dir, CONFIG_FILE), encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RunError(f"{work_dir}/{CONFIG_FILE} is not readable YAML ({type(e).__name__}); "
                       f"restore it from any checkpoint's 'config'") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise RunError(f"{work_dir}/{CONFIG_FILE} has no model section; it is not a config written by the trainer")
    latest, skipped = _records(os.path.join(work_dir, METRICS_FILE))
    by_kind = {"train": [], "val": []}
    for (kind, step), rec in sorted(latest.items(), key=lambda kv: kv[0][1]):
        if kind in by_kind:
            by_kind[kind].append(rec)
    if not any("top1" in r and r.get("epoch") for r in by_kind["val"]):
        raise RunError(f"{work_dir} has no validation metrics yet (no 'val' record in {METRICS_FILE}); wait for "
                       f"its first evaluation (eval.interval) or leave it out")
    return Run(work_dir, config, by_kind["train"], by_kind["val"], skipped)


def describe_blocks(model_cfg):
    """'ce', 'ed+se', 'we(lwe)+ce' ...: the conv factory (if not plain) and the plug-ins in order."""
    parts = []
    conv = model_cfg.get("conv") or {}
    if conv.get("type", "plain") != "plain":
        flags = [k for k in ("lwe", "mwe", "ws") if conv.get(k)]
        parts.append(f"{conv['type']}({'+'.join(flags)})" if conv["type"] == "we" else conv["type"])
    parts += [p.get("type", "?") for p in model_cfg.get("plugins") or []]
    return "+".join(parts) or "none"


def complexity(config):
    """(parameters in M, GFLOPs) of the run's model at its input size (one eval-mode image on the CPU)."""
    from analysis.flops import complexity as count
    from models import build_model
    model = build_model(dict(config["model"], pretrained=None))
    params, gflops = count(model, int(config.get("data", {}).get("input_size", 224)))
    return params / 1e6, gflops


def train_time(run):
    """Seconds of training: each logged step time times the steps since the previous record, plus evaluations."""
    total, prev = 0.0, 0
    for rec in run.train:
        if "step_time" in rec:
            total += rec["step_time"] * max(rec["step"] - prev, 0)
        prev = rec["step"]
    return total + sum(rec.get("time_s", 0.0) for rec in run.val)


def summarize(run, name, flops=True):
    """One table row (a dict over :data:`COLUMNS`; numbers stay numbers, unknowns are None)."""
    model_cfg = run.config["model"]
    val = [r for r in run.val if "top1" in r]
    best1, best5 = max(r["top1"] for r in val), max(r.get("top5", math.nan) for r in val)
    params, gflops = complexity(run.config) if flops else (None, None)
    last_step = max([r["step"] for r in run.train + run.val])
    speeds = [r["img_s"] for r in run.train if "img_s" in r]
    return {
        "run": name, "model": model_cfg.get("backbone", "?"), "blocks": describe_blocks(model_cfg),
        "params_m": params, "gflops": gflops,
        "epochs": round(last_step / run.steps_per_epoch, 2), "planned_epochs": run.config.get("train", {}).get("epochs"),
        "best_top1": best1, "best_top5": best5, "final_top1": val[-1]["top1"], "final_top5": val[-1].get("top5"),
        "top1_err": 100.0 - best1, "top5_err": 100.0 - best5,
        "train_img_s": statistics.median(speeds) if speeds else None, "train_time_s": train_time(run),
    }


def run_names(work_dirs):
    """Each run's directory name, or its path where two runs share a name."""
    names = [os.path.basename(os.path.normpath(d)) for d in work_dirs]
    return [n if names.count(n) == 1 else os.path.normpath(d) for n, d in zip(names, work_dirs)]


def _fmt(value, digits=2):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _hms(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def markdown(rows):
    head = ("| run | model | blocks | params (M) | GFLOPs | epochs | best top-1 | best top-5 | final top-1 | "
            "final top-5 | top-1 err | top-5 err | train img/s | train time |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        epochs = f"{_fmt(r['epochs'], 2).rstrip('0').rstrip('.')}/{r['planned_epochs']}"
        lines.append(f"| {r['run']} | {r['model']} | {r['blocks']} | {_fmt(r['params_m'])} | {_fmt(r['gflops'], 3)} | "
                     f"{epochs} | {_fmt(r['best_top1'])} | {_fmt(r['best_top5'])} | {_fmt(r['final_top1'])} | "
                     f"{_fmt(r['final_top5'])} | {_fmt(r['top1_err'])} | {_fmt(r['top5_err'])} | "
                     f"{_fmt(r['train_img_s'], 0)} | {_hms(r['train_time_s'])} |")
    return "\n".join(lines) + "\n"


def write_csv(rows, path):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(runs, names, path):
    """Training loss and validation top-1 against epoch, every run on the same two panels."""
    from analysis.figures import pyplot, save
    plt = pyplot()
    fig, (ax_loss, ax_top1) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run, name in zip(runs, names):
        spe = run.steps_per_epoch
        train = [r for r in run.train if "loss" in r]
        ax_loss.plot([r["step"] / spe for r in train], [r["loss"] for r in train], label=name, linewidth=1.2)
        val = [r for r in run.val if "top1" in r]
        ax_top1.plot([r["epoch"] for r in val], [r["top1"] for r in val], marker="o", markersize=3, label=name)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax_top1.set(xlabel="epoch", ylabel="top-1 (%)", title="validation top-1")
    for ax in (ax_loss, ax_top1):
        ax.grid(alpha=0.3)
    ax_top1.legend(fontsize=8)
    save(fig, path)


def plot_tradeoffs(rows, path):
    """Best top-1 against GFLOPs (when counted) and against training images/s, one labelled point per run."""
    from analysis.figures import pyplot, save
    plt = pyplot()
    panels = [(k, label, title) for k, label, title in (
        ("gflops", "GFLOPs (MACs) per image", "accuracy vs GFLOPs"),
        ("train_img_s", "training images/s", "accuracy vs training throughput")) if all(r[k] is not None for r in rows)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, label, title) in zip(axes[0], panels):
        for r in rows:
            ax.scatter(r[key], r["best_top1"])
            ax.annotate(r["run"], (r[key], r["best_top1"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xlabel=label, ylabel="best top-1 (%)", title=title)
        ax.grid(alpha=0.3)
    save(fig, path)
    return True
