"""Inhibited-channel analysis: what BN+ReLU leaves dead and what each block does about it.

    python -m tools.analyze_channels CONFIG CHECKPOINT [CONFIG CHECKPOINT ...] [key=value ...] [--names A B ...]
        [--batches 20] [--batch-size 64] [--threshold 0.01] [--out DIR]

Runs each model in eval mode over the validation split (``--batches`` batches at most;
``data.val_dir=train`` analyses the training images with the evaluation transform)
with the hooks of :mod:`analysis.channel_stats`, and reports per post-activation site:
the per-channel mean magnitude after the ReLU, the fraction of exactly-zero outputs, the
gamma of the norm before it, the *dead* channels (every output exactly zero) and the
*inhibited* channels: mean magnitude below ``--threshold`` times the layer's mean channel
magnitude. (The CE paper's own criterion could not be read here; this relative one does
not depend on the layer's scale, and the cumulative distributions it writes let a reader
apply any other threshold.) Per plug-in it reports CE's sigmoid(theta) and IR-gain spread,
SE's gates, WE's LWE gates and MWE gains, and the ED path's norm relative to its branch.

Writes ``channels.json`` (everything, per channel), ``channels.md`` (per-stage and
per-block tables) and two figures, every model on the same axes: ``cdf_stages.png``
(cumulative distribution of channel magnitude relative to the layer mean, one panel per
stage) and ``inhibited_depth.png`` (the inhibited fraction of each site along the depth).
A config or checkpoint that does not load is refused in one line before anything is written.
"""
import argparse
import json
import os
import sys

import torch

DEFAULT_OUT = "work_dirs/analyze_channels"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", nargs="+", metavar="CONFIG CHECKPOINT",
                   help="configs and checkpoints (path, model-zoo name or URL), in pairs; then key=value config "
                   "overrides for every model")
    p.add_argument("--names", nargs="+", help="a label per model (default: the config file names)")
    p.add_argument("--batches", type=int, default=20, help="batches of the validation set to run (default 20)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--threshold", type=float, default=0.01,
                   help="inhibited: mean magnitude below this times the layer's mean (default 0.01)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default %(default)s)")
    args = p.parse_intermixed_args(argv)
    args.overrides = [a for a in args.pairs if "=" in a and not os.path.exists(a)]
    args.pairs = [a for a in args.pairs if a not in args.overrides]
    if len(args.pairs) % 2:
        p.error("give CONFIG CHECKPOINT pairs (an odd number of paths was given)")
    if args.names and len(args.names) != len(args.pairs) // 2:
        p.error(f"--names needs {len(args.pairs) // 2} labels, one per CONFIG CHECKPOINT pair")
    if args.batches < 1 or args.batch_size < 1 or not 0 < args.threshold < 1:
        p.error("--batches and --batch-size must be >= 1 and --threshold in (0, 1)")
    return args


def load(config, checkpoint, overrides):
    """(model in eval mode, val loader, device transform) -- or ConfigError/CheckpointError/WeightsMismatchError."""
    from engine.checkpoint import load_checkpoint
    from engine.config import load_config
    from engine.hub import resolve_checkpoint
    from models import build_model
    from models.weights import load_weights
    import data as data_lib
    cfg = load_config(config, overrides)
    dataset = data_lib.build_dataset(cfg.data, "val", num_classes=cfg.model.num_classes)
    model = build_model(dict(cfg.model, pretrained=None))
    load_weights(model, load_checkpoint(resolve_checkpoint(checkpoint)))
    return model.eval(), dataset, data_lib.build_device_transform(cfg.data, "val"), cfg


def layer_rows(probe, threshold):
    """One dict per site: per-channel arrays and the layer's summary numbers."""
    rows = []
    for site in probe.sites:
        mag, zero, gamma = site.magnitudes(), site.zero_fraction(), site.gamma()
        mean = float(mag.mean())
        relative = mag / mean if mean > 0 else torch.zeros_like(mag)
        inhibited = int((relative < threshold).sum())
        rows.append({"site": site.name, "stage": site.stage, "channels": site.channels, "mean_magnitude": mean,
                     "zero_fraction": float(zero.mean()), "dead": int((zero == 1).sum()),
                     "inhibited": inhibited, "inhibited_fraction": inhibited / site.channels,
                     "gamma_abs_mean": float(gamma.abs().mean()),
                     "per_channel": {"magnitude": mag.tolist(), "relative_magnitude": relative.tolist(),
                                     "zero_fraction": zero.tolist(), "gamma": gamma.tolist()}})
    return rows


def stage_rows(rows):
    out = {}
    for r in rows:
        s = out.setdefault(r["stage"], {"stage": r["stage"], "sites": 0, "channels": 0, "dead": 0, "inhibited": 0,
                                        "zero_fraction_sum": 0.0})
        s["sites"] += 1
        s["channels"] += r["channels"]
        s["dead"] += r["dead"]
        s["inhibited"] += r["inhibited"]
        s["zero_fraction_sum"] += r["zero_fraction"] * r["channels"]
    for s in out.values():
        s["inhibited_fraction"] = s["inhibited"] / s["channels"]
        s["zero_fraction"] = s.pop("zero_fraction_sum") / s["channels"]
    return [out[k] for k in sorted(out)]


def analyze(model, dataset, transform, cfg, batches, batch_size, threshold, label="model"):
    """Run the hooks over ``batches`` batches; returns the report dict of one model."""
    from analysis.channel_stats import ChannelProbe
    import data as data_lib
    loader = data_lib.build_loader(dataset, cfg.data, "val", batch_size, False, cfg.runtime.seed)
    probe = ChannelProbe(model)
    total = min(batches, len(loader))
    try:
        with torch.no_grad():
            for i, (images, _target) in enumerate(loader):
                if i == total:
                    break
                model(transform(images))
                if (i + 1) % max(total // 5, 1) == 0 or i + 1 == total:
                    print(f"{label}: batch {i + 1}/{total}", file=sys.stderr, flush=True)
    finally:
        probe.remove()
    rows = layer_rows(probe, threshold)
    return {"images": min(total * batch_size, len(dataset)), "threshold": threshold, "layers": rows,
            "stages": stage_rows(rows), "blocks": probe.block_summaries()}


def markdown(reports):
    lines = []
    for name, rep in reports.items():
        lines += [f"## {name}", "", f"{rep['images']} validation images; inhibited = mean magnitude below "
                  f"{rep['threshold']:g} x the layer's mean; dead = every output exactly zero.", "",
                  "| stage | sites | channels | dead | inhibited | inhibited % | zero outputs % |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for s in rep["stages"]:
            lines.append(f"| {s['stage']} | {s['sites']} | {s['channels']} | {s['dead']} | {s['inhibited']} | "
                         f"{100 * s['inhibited_fraction']:.1f} | {100 * s['zero_fraction']:.1f} |")
        if rep["blocks"]:
            lines += ["", "| block | kind | what it does |", "|---|---|---|"]
            for b in rep["blocks"]:
                lines.append(f"| {b['name']} | {b['kind']} | {describe_block(b)} |")
        lines.append("")
    return "\n".join(lines)


def describe_block(b):
    if b["kind"] == "ce":
        text = f"sigmoid(theta) {b['sigmoid_theta']:.3f}"
        if "ir_gain" in b:
            g = b["ir_gain"]
            text += f"; IR gain mean {g['mean']:.3g}, std over channels {g['std_over_channels']:.3g}"
        return text
    if b["kind"] == "se" and "gate" in b:
        g = b["gate"]
        return f"gate mean {g['mean']:.3f}, std over channels {g['std_over_channels']:.3f}, min {g['min']:.3f}"
    if b["kind"] == "ed" and "path_to_branch_norm" in b:
        return f"path / branch norm {b['path_to_branch_norm']:.3f}"
    if b["kind"] == "we":
        parts = []
        if "lwe_gate" in b:
            parts.append(f"LWE gate mean {b['lwe_gate']['mean']:.3f} (min {b['lwe_gate']['min']:.3f})")
        if "mwe_magnitude" in b:
            parts.append(f"MWE gain mean {b['mwe_magnitude']['gain']['mean']:.3f} "
                         f"(max {b['mwe_magnitude']['gain']['max']:.3f})")
        return "; ".join(parts) or "plain"
    return "-"


def plot(reports, out_dir, threshold):
    import matplotlib.ticker

    from analysis.figures import pyplot, save
    plt = pyplot()
    stages = sorted({r["stage"] for rep in reports.values() for r in rep["layers"]})
    cols = min(len(stages), 4)
    rows = (len(stages) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    for ax, stage in zip(axes.flat, stages):
        for name, rep in reports.items():
            rel = sorted(v for r in rep["layers"] if r["stage"] == stage for v in r["per_channel"]["relative_magnitude"])
            if rel:
                ax.step([max(v, 1e-4) for v in rel], [(i + 1) / len(rel) for i in range(len(rel))], where="post",
                        label=name)
        ax.axvline(threshold, color="grey", linestyle=":", linewidth=1)
        ax.set(xscale="log", xlabel="channel magnitude / layer mean (dead: 1e-4)", ylabel="fraction of channels",
               title="stem" if stage == 0 else f"stage {stage}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(stages):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    save(fig, os.path.join(out_dir, "cdf_stages.png"))

    fig, ax = plt.subplots(figsize=(10, 3.8))
    for name, rep in reports.items():
        ax.plot([100 * r["inhibited_fraction"] for r in rep["layers"]], marker=".", label=name)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set(xlabel="site (input to output; see channels.json for names)", ylabel="inhibited channels (%)",
           title=f"inhibited channels along the depth (magnitude < {threshold:g} x layer mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, os.path.join(out_dir, "inhibited_depth.png"))


def main(argv=None):
    from core.fields import ConfigError
    from engine.checkpoint import CheckpointError
    from models.weights import WeightsMismatchError
    args = parse_args(argv)
    pairs = list(zip(args.pairs[::2], args.pairs[1::2]))
    names = args.names or [os.path.splitext(os.path.basename(c))[0] for c, _ in pairs]
    if len(set(names)) != len(names):
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    loaded = []
    for config, checkpoint in pairs:   # every model loads before anything runs or is written
        try:
            loaded.append(load(config, checkpoint, args.overrides))
        except (ConfigError, CheckpointError, WeightsMismatchError, OSError) as e:
            print(f"error: {config} + {checkpoint}: {e}", file=sys.stderr)
            return 2
    reports = {name: analyze(*item, args.batches, args.batch_size, args.threshold, label=name)
               for name, item in zip(names, loaded)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "channels.json"), "w", encoding="utf-8") as f:
        json.dump({"models": dict(zip(names, [list(p) for p in pairs])), "reports": reports}, f)
    table = markdown(reports)
    with open(os.path.join(args.out, "channels.md"), "w", encoding="utf-8") as f:
        f.write(table)
    plot(reports, args.out, args.threshold)
    print(table)
    print(f"wrote channels.json, channels.md, cdf_stages.png, inhibited_depth.png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
