"""Train a model from a config:  python -m tools.train [CONFIG] [key=value ...]

Usually started through ``./train.sh`` (tools/launch.py) or ``tools/slurm_train.sh`` (srun).
The work directory defaults to ``work_dirs/<config path under configs/>``
(e.g. ``work_dirs/imagenet/cenet/resnet50``); starting the
same command again resumes from its latest checkpoint.

Exit codes (core/exits.py): 0 finished; 1 unexpected error (traceback);
2 refused config/override/checkpoint/dataset or a work directory in use
(one-line message, nothing written); 3 loss stayed nan/inf; 74 a checkpoint
could not be written; 75 stopped by SIGTERM/SIGUSR1/SIGINT after saving: run
the same command to continue; 76 another process of the run died or never joined.
"""
import argparse
import os
import signal
import sys

from core.exits import (EXIT_IO, EXIT_NONFINITE, EXIT_OK, EXIT_PEER_LOST, EXIT_PREEMPTED, EXIT_USAGE, STOP_SIGNALS,
                        StoppedBeforeStart, stop_now)

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


def run(argv=None):
    # until the trainer's guard takes over, a stop signal ends the run in one line
    previous = {s: signal.signal(s, stop_now) for s in STOP_SIGNALS}
    stopped = False
    try:
        return _run(argv)
    except StoppedBeforeStart as e:  # nothing new to save
        stopped = True
        if (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0") == "0":
            print(f"stopped by {e.args[0]} before training started; nothing new to save", file=sys.stderr)
        return EXIT_PREEMPTED
    finally:
        if not stopped:  # once stopped, stop signals stay ignored: the process ends now
            for s, handler in previous.items():
                signal.signal(s, handler)


def _run(argv):
    from core.fields import ConfigError
    from data.errors import worker_lost
    from engine import distributed as du
    from engine.checkpoint import CheckpointError
    from engine.config import default_work_dir, load_config
    from engine.guard import NonFiniteError
    from engine.relay import report_error
    args = parse_args(argv)
    code, err = EXIT_OK, None
    try:
        if args.check:
            from analysis.check import check
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
