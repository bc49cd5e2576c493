"""Try a combination before a cluster run:  python -m tools.check CONFIG [key=value ...] [--steps 3] [--batch 2]

Loads the config (every key checked), builds its model, prints where the blocks
were placed (module names, with their options and the parameters they add),
the parameters and GFLOPs against the plain backbone (no plug-ins, plain convs),
then runs a few SGD steps (the config's optimizer settings) on synthetic images
of the config's input size, on CPU, and prints the losses. Nothing is written
and nothing is downloaded (``model.pretrained`` is not loaded). Takes seconds for
a CIFAR model, well under a minute for a ResNet-152 at 224x224.
``python -m tools.train CONFIG --check`` runs the same. Exit codes: 0 ok,
2 refused config (one line), 3 loss not finite.
"""
import argparse
import sys

from analysis.check import check


def _positive(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0].split(":", 1)[1].strip(),
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value (YAML values)")
    p.add_argument("--steps", type=_positive, default=3, help="training steps on synthetic data (default 3)")
    p.add_argument("--batch", type=_positive, default=2, help="images per step (default 2; BatchNorm needs 2)")
    args = p.parse_args(argv)
    from core.exits import EXIT_USAGE
    from core.fields import ConfigError
    try:
        return check(args.config, args.overrides, args.steps, args.batch)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
