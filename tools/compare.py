"""Put training runs side by side: one table (markdown and CSV) and PNG plots.

    python -m tools.compare WORK_DIR [WORK_DIR ...] [--out DIR] [--no-flops]

Reads only what the trainer already writes into a work directory: the resolved
``config.yaml`` and ``metrics.jsonl``. A run that is unfinished is read as it
stands; a resumed run appends to its ``metrics.jsonl``, and a record logged
again at the same step (the run went back to an earlier checkpoint and did the
step again) replaces the earlier one.

Columns: model and blocks, parameters and GFLOPs (true multiply-accumulates at
the run's ``data.input_size``, as ``tools.flops`` counts them), epochs done of
planned, best and final top-1/top-5 and the errors ED-Net reports (100 - best
top-1 and 100 - best top-5, each best taken over epochs separately), the median
training images/s of the logged intervals, and training time (the logged step
times times the steps they cover, plus evaluation time: time between a stop and
its resume is not counted).

Writes ``runs.md``, ``runs.csv``, ``curves.png`` (training loss and validation
top-1 against epoch) and ``tradeoffs.png`` (best top-1 against GFLOPs and
against training throughput) into ``--out``. A directory that is not a run, or a
run with no validation record yet, is refused in one line before anything is written.
"""
import argparse
import os
import sys

from analysis.runs import (METRICS_FILE, RunError, markdown, plot_curves, plot_tradeoffs, read_run, run_names,
                           summarize, write_csv)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work_dirs", nargs="+", help="work directories of training runs")
    p.add_argument("--out", default="work_dirs/compare", help="where the table and plots go (default %(default)s)")
    p.add_argument("--no-flops", action="store_true", help="skip building each model to count params and GFLOPs")
    args = p.parse_args(argv)
    try:
        runs = [read_run(d) for d in args.work_dirs]   # every run is read before anything is written
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for run in runs:
        if run.skipped_lines:
            print(f"warning: {run.work_dir}/{METRICS_FILE}: skipped {run.skipped_lines} unreadable line(s) "
                  f"(a run killed while writing leaves one)", file=sys.stderr)
    names = run_names(args.work_dirs)
    rows = [summarize(run, name, flops=not args.no_flops) for run, name in zip(runs, names)]
    table = markdown(rows)
    print(table, end="")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "runs.md"), "w", encoding="utf-8") as f:
        f.write(table)
    write_csv(rows, os.path.join(args.out, "runs.csv"))
    plot_curves(runs, names, os.path.join(args.out, "curves.png"))
    written = ["runs.md", "runs.csv", "curves.png"]
    if plot_tradeoffs(rows, os.path.join(args.out, "tradeoffs.png")):
        written.append("tradeoffs.png")
    print(f"wrote {', '.join(written)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
