"""Re-save a checkpoint you trust as plain tensors/containers, so blocklab can load it safely.

``load_checkpoint`` refuses files whose unpickling needs code (custom classes,
numpy scalars, argparse.Namespace, whole pickled modules, ...). If you trust
where such a file came from, this tool unpickles it ONCE with full pickle (which
can run code from the file) and writes a copy that loads with weights_only=True::

    python -m tools.convert_pickle --trust old.pth.tar plain.pth
"""
import argparse
import collections
import pickle
import sys

import numpy as np
import torch

from engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, to_plain


def _loosen(obj):
    """Turn common non-plain objects into plain ones before :func:`to_plain` checks the rest."""
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, argparse.Namespace):
        return {k: _loosen(v) for k, v in vars(obj).items()}
    if isinstance(obj, collections.abc.Mapping):
        return type(obj)((k, _loosen(v)) for k, v in obj.items()) if isinstance(obj, collections.OrderedDict) \
            else {k: _loosen(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_loosen(v) for v in obj) if type(obj) in (list, tuple) else tuple(_loosen(v) for v in obj)
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj
    if hasattr(obj, 'state_dict') and callable(obj.state_dict):
        return obj.state_dict()
    return obj


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('src', help='checkpoint to convert (it will be fully unpickled: trust it first)')
    p.add_argument('dst', help='where to write the plain copy')
    p.add_argument('--trust', action='store_true', help='confirm that you trust SRC; required')
    args = p.parse_args(argv)
    if not args.trust:
        p.error('this unpickles SRC with full pickle, which can run code from it; pass --trust if you trust it')
    try:
        try:
            state = torch.load(args.src, map_location='cpu', weights_only=False)
        except RuntimeError as exc:  # not a torch.save file: a plain pickle (pickle.dump)
            if 'magic number' not in str(exc):
                raise
            with open(args.src, 'rb') as f:
                state = pickle.load(f)
        plain = to_plain(_loosen(state))
        save_checkpoint(plain if isinstance(plain, dict) else {'state_dict': plain}, args.dst)
        load_checkpoint(args.dst)
    except CheckpointError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is reported in one line
        print(f'error: could not read {args.src}: {type(exc).__name__}: {exc}'.splitlines()[0], file=sys.stderr)
        return 2
    print(f'wrote {args.dst} (loads with weights_only=True)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
