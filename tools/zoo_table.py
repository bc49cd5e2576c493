"""Generate model_zoo/MODEL_ZOO.md from model_zoo/index.yaml (the table is never edited by hand).

    python -m tools.zoo_table            # rewrite MODEL_ZOO.md
    python -m tools.zoo_table --check    # exit 1 if MODEL_ZOO.md is out of date (tests run this)
"""
import argparse
import sys

from engine.zoo_table import in_sync, table_path, write


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--index', help='index.yaml (default: model_zoo/index.yaml)')
    p.add_argument('--check', action='store_true', help='exit 1 if MODEL_ZOO.md does not match the index')
    args = p.parse_args(argv)
    if args.check:
        if in_sync(args.index):
            return 0
        print(f'{table_path(args.index)} is out of date: run python -m tools.zoo_table', file=sys.stderr)
        return 1
    print(f'wrote {write(args.index)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
