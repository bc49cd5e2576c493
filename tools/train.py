"""Train a model from a config:  python -m tools.train [CONFIG] [key=value ...]

Usually started through ``./train.sh`` (torchrun) or ``tools/slurm_train.sh`` (srun).
The work directory defaults to ``work_dirs/<config file name>``; starting the
same command again resumes from its latest checkpoint.

Exit codes (engine/guard.py): 0 finished; 1 unexpected error (traceback);
2 refused config/override/checkpoint/dataset (one-line message, nothing
written); 3 loss stayed nan/inf; 74 a checkpoint could not be written;
75 stopped by SIGTERM/SIGUSR1 after saving: run the same command to continue.
"""
import argparse
import os
import sys

DEFAULT_CONFIG = "configs/default.yaml"
EXIT_FILE_ENV = "BLOCKLAB_EXIT_FILE"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a blocklab model.", epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value (YAML values)")
    p.add_argument("--check", action="store_true", help="only load and check the config (exit 0 or 2)")
    args = p.parse_args(argv)
    if "=" in args.config:  # only overrides were given
        args.overrides.insert(0, args.config)
        args.config = DEFAULT_CONFIG
    return args


def default_work_dir(config_path):
    return os.path.join("work_dirs", os.path.splitext(os.path.basename(config_path))[0])


def report_exit(code):
    """Tell a wrapper script (train.sh) our exit code: torchrun does not pass it through."""
    path = os.environ.get(EXIT_FILE_ENV)
    if path and os.environ.get("RANK", "0") == "0":
        try:
            with open(path, "w") as f:
                f.write(f"{code}\n")
        except OSError:
            pass
    return code


def run(argv=None):
    from engine import distributed as du
    from engine.checkpoint import CheckpointError
    from engine.config import load_config
    from engine.fields import ConfigError
    from engine.guard import EXIT_IO, EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, NonFiniteError
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.runtime.work_dir is None:
            cfg.runtime.work_dir = default_work_dir(args.config)
        if args.check:
            return EXIT_OK
        from engine.trainer import Trainer
        trainer = Trainer(cfg)
        result = trainer.train()
    except ConfigError as e:
        if du.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_IO
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    finally:
        du.destroy()
    return EXIT_PREEMPTED if result["status"] == "preempted" else EXIT_OK


def main(argv=None):
    sys.exit(report_exit(run(argv)))


if __name__ == "__main__":
    main()
