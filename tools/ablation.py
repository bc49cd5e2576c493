"""The laptop ablation: ResNet-20 on the embedded digits data, plain vs CE / ED / SE / WE, several seeds.

    python -m tools.ablation                      # 5 variants x 3 seeds, about 15 minutes on 2 CPU cores
    python -m tools.ablation train.epochs=4 --seeds 0 1 --variants resnet20 ce_resnet20

Trains every ``configs/ablation/<variant>.yaml`` once per seed (``python -m tools.train``,
``--jobs`` at a time, work dirs ``<work-root>/<variant>_s<seed>``; a finished run is not trained again, an
interrupted one resumes), then puts the runs side by side with :mod:`tools.compare`,
aggregates best and final top-1 over seeds (mean +- sample std), tests each block's
difference to the plain network against the seed noise, and runs
:mod:`tools.analyze_channels` on the first seed of every variant. ``--out`` (default
``docs/ablation``) gets ``README.md`` (the table, the command and its wall time),
``runs.csv``, ``top1.png``, ``curves.png``, ``cdf_stages.png`` and ``inhibited_depth.png``.

On a data set this small, differences between blocks are mostly within noise; the table
says, per block, whether the difference to the plain network exceeds twice its standard
error (seed-to-seed spread plus the validation set's sampling noise).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("resnet20", "ce_resnet20", "ed_resnet20", "se_resnet20", "we_resnet20")
CONFIG_DIR = "configs/ablation"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="configs/ablation/<name>.yaml to run")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    p.add_argument("--work-root", default="work_dirs/ablation", help="parent of the runs' work dirs")
    p.add_argument("--out", default="docs/ablation", help="where the table and figures go")
    p.add_argument("--batches", type=int, default=6, help="validation batches for the channel analysis")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="trainings at once, each with cpu_count / jobs threads (default %(default)s)")
    args = p.parse_intermixed_args(argv)
    missing = [v for v in args.variants if not os.path.isfile(os.path.join(CONFIG_DIR, v + ".yaml"))]
    if missing:
        p.error(f"no {CONFIG_DIR}/{missing[0]}.yaml; variants: {', '.join(sorted(VARIANTS))}")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if len(args.seeds) < 2:
        p.error("give at least two --seeds: the table compares blocks against the seed noise")
    return args


def train_all(jobs, overrides, parallel):
    """Run ``(config, work_dir, seed)`` jobs through the training entry point, ``parallel`` at a time.

    Small models train faster as parallel one-thread processes than as one process with
    several threads; a finished run returns at once, an interrupted one resumes.
    """
    threads = str(max(1, (os.cpu_count() or 1) // parallel))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            config, work_dir, seed = pending.pop(0)
            print(f"training {config} seed {seed} -> {work_dir}", flush=True)
            cmd = [sys.executable, "-m", "tools.train", config, f"runtime.seed={seed}",
                   f"runtime.work_dir={work_dir}", "runtime.tensorboard=false", *overrides]
            log = open(work_dir + ".log", "w")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, work_dir))
        proc, log, work_dir = running.pop(0)
        rc = proc.wait()
        log.close()
        if rc != 0:
            for other, other_log, _ in running:
                other.terminate()
                other.wait()
                other_log.close()
            raise SystemExit(f"error: training into {work_dir} exited with {rc}; see {work_dir}.log")


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _noise_var(values, val_images):
    """Variance of a mean top-1 (in points^2): seed-to-seed spread plus the binomial sampling noise
    of an accuracy measured on ``val_images`` images (which a few seeds of a near-100% metric,
    quantised in steps of one image, cannot show: three equal seeds have zero spread)."""
    p = statistics.mean(values) / 100
    return statistics.variance(values) / len(values) + 1e4 * p * (1 - p) / val_images


def aggregate(rows, variants, val_images):
    """Per variant: mean/std of best and final top-1 over seeds, and the difference to the first variant
    with its standard error (seed noise and validation-set sampling noise of both means)."""
    by = {v: [r for r in rows if r["variant"] == v] for v in variants}
    out = []
    base = [r["best_top1"] for r in by[variants[0]]]
    for v in variants:
        best = [r["best_top1"] for r in by[v]]
        final = [r["final_top1"] for r in by[v]]
        (bm, bs), (fm, fs) = mean_std(best), mean_std(final)
        diff = bm - statistics.mean(base)
        se = (_noise_var(best, val_images) + _noise_var(base, val_images)) ** 0.5
        out.append({"variant": v, "seeds": len(best), "params_m": by[v][0]["params_m"], "gflops": by[v][0]["gflops"],
                    "best_mean": bm, "best_std": bs, "final_mean": fm, "final_std": fs, "diff": diff, "se": se,
                    "img_s": statistics.median(r["train_img_s"] for r in by[v]), "best": best})
    return out


def markdown(agg, command, wall, seeds, val_images, train_s):
    lines = ["| variant | params (M) | GFLOPs | best top-1 (%) | final top-1 (%) | "
             f"vs {agg[0]['variant']} (best) | "
             "beyond noise? | train img/s |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    for i, a in enumerate(agg):
        if i == 0:
            vs, noise = "-", "-"
        else:
            vs = f"{a['diff']:+.2f} ± {a['se']:.2f}"
            noise = "yes" if abs(a["diff"]) > 2 * a["se"] else "no (within 2 standard errors)"
        lines.append(f"| {a['variant']} | {a['params_m']:.3f} | {a['gflops']:.4f} | {a['best_mean']:.2f} ± "
                     f"{a['best_std']:.2f} | {a['final_mean']:.2f} ± {a['final_std']:.2f} | {vs} | {noise} | "
                     f"{a['img_s']:.0f} |")
    return "\n".join([
        "# Laptop ablation: ResNet-20 on digits, plain vs CE / ED / SE / WE", "",
        f"Generated by `{command}`: {wall / 60:.1f} minutes of wall time for this invocation (runs finished "
        f"before are not trained again) and {train_s / 60:.1f} minutes of training summed over the runs. "
        f"Seeds: {', '.join(map(str, seeds))}; mean ± sample standard deviation over seeds; best = the best "
        "epoch's top-1 (selected on the validation set itself, so optimistic), final = the last epoch's.", "",
        f"\"vs {agg[0]['variant']}\" is the difference of mean best top-1 to it ± its standard error, which adds "
        f"the seed-to-seed spread and the sampling noise of an accuracy measured on {val_images} validation images "
        f"(one image = {100 / val_images:.2f} points). A block counts as beyond noise only when the difference "
        "exceeds two standard errors. On a data set this small and this easy, no block is expected to be: these "
        "numbers rank nothing on ImageNet; they show that every block trains, what it costs, and how it changes "
        "the channels.", "",
        *lines, "",
        "![best top-1 per variant, every seed](top1.png)", "",
        "![validation top-1 per epoch, mean over seeds](curves.png)", "",
        "Channel magnitudes after each norm-ReLU and block output, first seed of each variant "
        "(`python -m tools.analyze_channels`; inhibited = below 0.01 x the layer's mean):", "",
        "![cumulative distribution of channel magnitudes per stage](cdf_stages.png)", "",
        "![inhibited channels along the depth](inhibited_depth.png)", ""])


def plot(agg, runs_by_variant, out, val_images):
    from analysis.figures import pyplot, save
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, a in enumerate(agg):
        ax.errorbar([i], [a["best_mean"]], yerr=[a["best_std"]], fmt="o", capsize=5, color=f"C{i}")
        ax.scatter([i + 0.12] * len(a["best"]), a["best"], s=12, color=f"C{i}", alpha=0.6)
    ax.set_xticks(range(len(agg)), [a["variant"] for a in agg])
    ax.set(ylabel="best validation top-1 (%)",
           title=f"best top-1: mean ± std over seeds (dots: seeds; one image = {100 / val_images:.2f} points)")
    ax.grid(alpha=0.3, axis="y")
    save(fig, os.path.join(out, "top1.png"))

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, (variant, runs) in enumerate(runs_by_variant.items()):
        curves = [[r["top1"] for r in run.val if "top1" in r] for run in runs]
        n = min(len(c) for c in curves)
        mean = [statistics.mean(c[k] for c in curves) for k in range(n)]
        std = [statistics.stdev(c[k] for c in curves) if len(curves) > 1 else 0.0 for k in range(n)]
        epochs = [r["epoch"] for r in runs[0].val if "top1" in r][:n]
        ax.plot(epochs, mean, label=variant, color=f"C{i}")
        ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=f"C{i}", alpha=0.15)
    ax.set(xlabel="epoch", ylabel="validation top-1 (%)", title="validation top-1, mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, os.path.join(out, "curves.png"))


def main(argv=None):
    from analysis import runs as compare
    args = parse_args(argv)
    start = time.time()
    os.makedirs(args.work_root, exist_ok=True)
    dirs = {(v, s): os.path.join(args.work_root, f"{v}_s{s}") for v in args.variants for s in args.seeds}
    train_all([(os.path.join(CONFIG_DIR, v + ".yaml"), d, s) for (v, s), d in dirs.items()], args.overrides, args.jobs)
    runs = {key: compare.read_run(d) for key, d in dirs.items()}
    rows = []
    for (variant, seed), run in runs.items():
        rows.append({"variant": variant, "seed": seed, **compare.summarize(run, f"{variant}_s{seed}")})
    os.makedirs(args.out, exist_ok=True)
    compare.write_csv([{k: r[k] for k in compare.COLUMNS} for r in rows], os.path.join(args.out, "runs.csv"))
    val_images = next(iter(runs.values())).val[-1]["count"]
    agg = aggregate(rows, args.variants, val_images)
    plot(agg, {v: [runs[(v, s)] for s in args.seeds] for v in args.variants}, args.out, val_images)
    pairs = []
    for variant in args.variants:
        work_dir = dirs[(variant, args.seeds[0])]
        pairs += [os.path.join(work_dir, "config.yaml"), os.path.join(work_dir, "checkpoints", "best.pth")]
    channel_dir = os.path.join(args.work_root, "channels")
    if subprocess.run([sys.executable, "-m", "tools.analyze_channels", *pairs, "--names", *args.variants,
                       "--batches", str(args.batches), "--out", channel_dir]).returncode != 0:
        raise SystemExit("error: the channel analysis failed (see above)")
    for png in ("cdf_stages.png", "inhibited_depth.png"):
        os.replace(os.path.join(channel_dir, png), os.path.join(args.out, png))
    command = "python -m tools.ablation" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    text = markdown(agg, command, time.time() - start, args.seeds, val_images, sum(r["train_time_s"] for r in rows))
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
