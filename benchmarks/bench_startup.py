"""Time to the first training step: ``./train.sh`` against ``python -m tools.train``, same config, same run.

    python -m benchmarks.bench_startup [--config configs/default.yaml] [--rounds 5] [--procs 1]
        [--baseline-repo DIR] [--out benchmarks/results/startup_cpu.md]

Each round starts every command once, in turn (interleaved, so a machine that
gets busier or quieter affects them alike), in a fresh work directory, with
``runtime.max_steps=1`` and a log line per step, and records the wall time from
the start to the first ``epoch 1/N [1/...]`` line on its output, and the CPU
time all its processes used until they ended (one step later): on a shared
machine other jobs stretch wall times by whole factors but hardly CPU time, so
the CPU ratio is the robust one. Medians over the rounds and the ratio
``train.sh / tools.train`` are printed (goal: <= 1.5) and written as markdown.
``--baseline-repo`` adds the ``train.sh`` of another checkout (e.g. a
``git worktree`` of an older commit) as a third command.
"""
import argparse
import datetime
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_STEP = re.compile(r"epoch 1/\d+ \[1/\d+\]")


def _children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def time_to_first_step(cmd, cwd, env, timeout=600):
    """(wall seconds until ``cmd``'s output shows the first step, CPU seconds of all its processes)."""
    cpu = _children_cpu()
    begin = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, out = None, []
    for line in p.stdout:
        out.append(line)
        if seen is None and FIRST_STEP.search(line):
            seen = time.perf_counter() - begin
    p.wait(timeout=timeout)
    if seen is None:
        tail = "".join(out)[-2000:]
        raise SystemExit(f"error: no first-step line from {' '.join(cmd)} (exit {p.returncode}):\n{tail}")
    return seen, _children_cpu() - cpu


def commands(args, work):
    over = ["runtime.max_steps=1", "runtime.log_interval=1", "runtime.tensorboard=false", "eval.final=false"]
    cmds = {"python -m tools.train": [sys.executable, "-m", "tools.train", args.config, *over,
                                      f"runtime.work_dir={work}/direct"],
            f"./train.sh CONFIG {args.procs}": [os.path.join(ROOT, "train.sh"), args.config, str(args.procs), *over,
                                                f"runtime.work_dir={work}/train_sh"]}
    if args.baseline_repo:
        cmds[f"baseline ./train.sh CONFIG {args.procs}"] = [os.path.join(args.baseline_repo, "train.sh"), args.config,
                                                            str(args.procs), *over, f"runtime.work_dir={work}/base"]
    return cmds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--procs", type=int, default=1, help="NUM_PROCS given to train.sh (default 1)")
    p.add_argument("--baseline-repo", help="also time the train.sh of this checkout")
    p.add_argument("--out", help="write the table as markdown here")
    args = p.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["PYTHONPATH"] = ROOT
    times, cpus = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        for r in range(args.rounds):
            for name, cmd in commands(args, os.path.join(tmp, str(r))).items():
                wall, cpu = time_to_first_step(cmd, ROOT, env)
                times.setdefault(name, []).append(wall)
                cpus.setdefault(name, []).append(cpu)
                print(f"round {r + 1}/{args.rounds}: {name}: {wall:.2f}s to step 1, {cpu:.2f}s CPU", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpus.items()}
    direct, direct_cpu = med["python -m tools.train"], med_cpu["python -m tools.train"]
    rows = [f"| `{k}` | {med[k]:.2f} | {med[k] / direct:.2f}x | {med_cpu[k]:.2f} | {med_cpu[k] / direct_cpu:.2f}x | "
            f"{', '.join(f'{t:.1f}' for t in v)} |" for k, v in times.items()]
    sh = f"./train.sh CONFIG {args.procs}"
    ratio, ratio_cpu = med[sh] / direct, med_cpu[sh] / direct_cpu
    text = "\n".join([
        "# Time to the first training step (cpu)", "",
        f"Command: `python -m benchmarks.bench_startup {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
        f"Date: {datetime.date.today()}; {platform.machine()}, {os.cpu_count()} cores; load average "
        f"{os.getloadavg()[0]:.1f} at the end (a machine shared with other jobs). Config `{args.config}`, "
        f"{args.rounds} interleaved rounds, fresh work directory each time.", "",
        "| command | median wall s to step 1 | vs tools.train | median CPU s | vs tools.train | wall per round (s) |",
        "|---|---:|---:|---:|---:|---|", *rows, "",
        f"**train.sh / tools.train: {ratio:.2f}x wall, {ratio_cpu:.2f}x CPU** (goal <= 1.5x)."])
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
