"""Train a model from a config:  python -m tools.train [CONFIG] [key=value ...]

Usually started through ``./train.sh`` (tools/launch.py) or ``tools/slurm_train.sh`` (srun).
The work directory defaults to ``work_dirs/<config path under configs/>``
(e.g. ``work_dirs/imagenet/cenet/resnet50``); starting the
same command again resumes from its latest checkpoint.

Exit codes (engine/guard.py): 0 finished; 1 unexpected error (traceback);
2 refused config/override/checkpoint/dataset or a work directory in use
(one-line message, nothing written); 3 loss stayed nan/inf; 74 a checkpoint
could not be written; 75 stopped by SIGTERM/SIGUSR1/SIGINT after saving: run
the same command to continue; 76 another process of the run died or never joined.
"""
import argparse
import os
import signal
import sys

DEFAULT_CONFIG = "configs/default.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a blocklab model.", epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value (YAML values)")
    p.add_argument("--check", action="store_true", help="try the combination instead of training: build it, show "
                   "the blocks placed, run 3 steps on synthetic data, write nothing (python -m tools.check)")
    args = p.parse_args(argv)
    if "=" in args.config:  # only overrides were given
        args.overrides.insert(0, args.config)
        args.config = DEFAULT_CONFIG
    return args


def default_work_dir(config_path):
    """``work_dirs/<path under configs/ without .yaml>`` (configs/imagenet/cenet/resnet50.yaml ->
    work_dirs/imagenet/cenet/resnet50), so that recipes of the same file name never share a run; a config
    outside any ``configs/`` folder gets ``work_dirs/<file name>``."""
    parts = os.path.normpath(os.path.abspath(os.path.splitext(config_path)[0])).split(os.sep)
    if "configs" in parts[:-1]:
        last = len(parts) - 1 - parts[::-1].index("configs", 1)  # the innermost configs/ folder
        return os.path.join("work_dirs", *parts[last + 1:])
    return os.path.join("work_dirs", parts[-1])


class StoppedBeforeStart(BaseException):
    """A stop signal before the trainer's guard took over.

    Not KeyboardInterrupt: CPython remembers a KeyboardInterrupt raised inside
    exec'd source (dataclasses, namedtuple, torch's imports build classes that
    way) and, run with ``-m``, kills itself with SIGINT at exit even though the
    exception was caught, so the run would end with -2 instead of 75."""


SETUP_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def stop_now(signum, frame):
    # the same stop arrives more than once (SLURM signals every process and the launcher forwards it):
    # the first one stops the run, the others are ignored until the process has exited
    for s in SETUP_STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise StoppedBeforeStart(signal.Signals(signum).name)


def run(argv=None):
    # until the trainer's guard takes over, a stop signal ends the run in one line
    previous = {s: signal.signal(s, stop_now) for s in SETUP_STOP_SIGNALS}
    stopped = False
    try:
        return _run(argv)
    except StoppedBeforeStart as e:  # nothing new to save
        stopped = True
        if (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0") == "0":
            print(f"stopped by {e.args[0]} before training started; nothing new to save", file=sys.stderr)
        return 75  # engine.guard.EXIT_PREEMPTED (maybe not imported yet)
    finally:
        if not stopped:  # once stopped, stop signals stay ignored: the process ends now
            for s, handler in previous.items():
                signal.signal(s, handler)


def _run(argv):
    from engine import distributed as du
    from engine.checkpoint import CheckpointError
    from engine.config import load_config
    from core.fields import ConfigError
    from engine.guard import (EXIT_IO, EXIT_NONFINITE, EXIT_OK, EXIT_PEER_LOST, EXIT_PREEMPTED, EXIT_USAGE,
                              NonFiniteError)
    from engine.relay import report_error
    from data.errors import worker_lost
    args = parse_args(argv)
    code, err = EXIT_OK, None
    try:
        if args.check:
            from tools.check import check
            return check(args.config, args.overrides)
        cfg = load_config(args.config, args.overrides)
        if cfg.runtime.work_dir is None:
            cfg.runtime.work_dir = default_work_dir(args.config)
        from engine.trainer import Trainer
        result = Trainer(cfg).train()
        code = EXIT_PREEMPTED if result["status"] == "preempted" else EXIT_OK
    except ConfigError as e:
        code, err = EXIT_USAGE, f"error: {e}"
    except CheckpointError as e:
        code, err = EXIT_IO, f"error: {e}"
    except NonFiniteError as e:
        code, err = EXIT_NONFINITE, f"error: {e}"
    except RuntimeError as e:  # a dead process of the run: one line (the launcher names the process), else a bug
        lost = du.as_peer_lost(e) or worker_lost(e)
        if lost is None:
            raise
        code, err = EXIT_PEER_LOST, f"error: {lost}"
        if os.environ.get("BLOCKLAB_LAUNCHER") and "lost contact" in err:
            err = None
    finally:
        du.destroy()
    if err:
        report_error(err)  # once on the console, whichever rank (engine/relay.py)
    return code


def main(argv=None):
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
