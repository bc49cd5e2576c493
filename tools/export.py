"""Export a training checkpoint to the model zoo: weights only, hash-named, indexed.

    python -m tools.export work_dirs/ce_resnet50/checkpoints/best.pth [key=value ...] --name ce_resnet50 \\
        --config configs/imagenet/cenet/ce_resnet50.yaml --metrics top1=77.9 top5=93.9 \\
        [--ema] [--published top1=78.1] [--url-prefix https://host/zoo/] [--force]

Config overrides (``key=value``) come right after the checkpoint, before ``--metrics``/``--published``.

Writes ``model_zoo/weights/<name>-<sha256[:8]>.pth`` (a plain state dict, no
optimizer, EMA weights with ``--ema``), checks that it loads strictly into the
model the config builds, adds ``<name>`` to ``model_zoo/index.yaml`` (config,
file/url, sha256, metrics, params, GFLOPs) and regenerates ``MODEL_ZOO.md``.
"""
import argparse
import collections
import hashlib
import io
import os
import re
import sys

import torch

from core.fields import ConfigError
from engine import zoo_table
from engine.checkpoint import CheckpointError, atomic_write, load_checkpoint
from engine.hub import REPO_ROOT, index_path, load_index, save_index

_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*$')


class ExportError(ValueError):
    """An export that cannot be done; one line."""


def _pairs(items, what):
    out = {}
    for item in items or ():
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ExportError(f'--{what} expects key=value (e.g. top1=77.1), got {item!r}')
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def extract_weights(state, ema=False):
    """The model (or EMA) state dict of a training checkpoint, prefixes stripped, on CPU."""
    from models.weights import checkpoint_weights, unwrap_state_dict
    sd = unwrap_state_dict(checkpoint_weights(state, ema))
    return collections.OrderedDict((k, v.detach().cpu().contiguous().clone()) for k, v in sd.items())


def serialize(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return buf.getvalue()


def _relative(path, start):
    path = os.path.abspath(path)
    try:
        rel = os.path.relpath(path, start)
    except ValueError:
        return path
    return path if rel.startswith('..' + os.sep) and not path.startswith(REPO_ROOT) else rel


def check_and_measure(weights, config, overrides=(), input_size=None):
    """Build the config's model, load ``weights`` strictly; return (params, GFLOPs, input size)."""
    from analysis.flops import complexity
    from engine.config import load_config
    from models import build_model
    from models.features import require_classifier
    from models.weights import load_weights
    cfg = load_config(config, list(overrides))
    require_classifier(cfg.model, "a model-zoo entry (classification weights that ./test.sh evaluates)")
    model = build_model(cfg.model)
    load_weights(model, weights, strict=True)
    size = input_size or cfg.data.get('input_size') or 224
    params, gflops = complexity(model, size)
    return params, gflops, size


def export(checkpoint, name, config, metrics=None, published=None, ema=False, url_prefix=None,
           out_dir=None, index=None, force=False, overrides=(), input_size=None, notes=None):
    """Do the export; returns the new index entry. Raises ExportError/CheckpointError/ConfigError."""
    if not _NAME.match(name):
        raise ExportError(f'bad model name {name!r}: use letters, digits, _ . - (e.g. ce_resnet50)')
    models = load_index(index)
    if name in models and not force:
        raise ExportError(f'{name!r} is already in {index_path(index)}; pass --force to replace it')
    if not os.path.isfile(config):
        raise ExportError(f'config {config} not found')
    state = load_checkpoint(checkpoint)
    weights = extract_weights(state, ema)
    params, gflops, size = check_and_measure(weights, config, overrides, input_size)
    data = serialize(weights)
    sha = hashlib.sha256(data).hexdigest()
    zoo_dir = os.path.dirname(index_path(index))
    out_dir = out_dir or os.path.join(zoo_dir, 'weights')
    path = os.path.join(out_dir, f'{name}-{sha[:8]}.pth')
    atomic_write(path, lambda f: f.write(data))
    if metrics is None:
        metrics = {k: float(v) for k, v in (state.get('metrics') or {}).items()} if isinstance(state, dict) else {}
    entry = {'config': _relative(config, REPO_ROOT), 'file': _relative(path, zoo_dir)}
    if url_prefix:
        entry['url'] = url_prefix.rstrip('/') + '/' + os.path.basename(path)
    entry.update({'sha256': sha, 'metrics': dict(metrics), 'params': int(params), 'gflops': round(float(gflops), 3),
                  'input_size': int(size), 'ema': bool(ema),
                  'source': {'checkpoint': os.path.basename(checkpoint),
                             'epoch': state.get('epoch') if isinstance(state, dict) else None,
                             'step': state.get('step') if isinstance(state, dict) else None}})
    if published:
        entry['published'] = dict(published)
    if notes:
        entry['notes'] = notes
    old = models.get(name)
    models[name] = entry
    save_index(models, index)
    zoo_table.write(index)
    if old and old.get('file') and old['file'] != entry['file']:
        stale = os.path.join(zoo_dir, old['file'])
        if os.path.isfile(stale):
            os.remove(stale)
    return entry


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('checkpoint', help='training checkpoint (e.g. WORK_DIR/checkpoints/best.pth)')
    p.add_argument('overrides', nargs='*', metavar='key=value', help='config overrides, e.g. data.input_size=256')
    p.add_argument('--name', required=True, help='zoo name, e.g. ce_resnet50')
    p.add_argument('--config', required=True, help='the YAML config the weights belong to')
    p.add_argument('--metrics', nargs='+', metavar='K=V', help='measured metrics, e.g. top1=77.9 top5=93.9')
    p.add_argument('--published', nargs='+', metavar='K=V', help="the original's figures, e.g. top1=78.1")
    p.add_argument('--ema', action='store_true', help='export the EMA weights instead of the raw ones')
    p.add_argument('--url-prefix', help='where the file will be hosted (the entry gets url = prefix/file)')
    p.add_argument('--out-dir', help='where to write the weights (default: model_zoo/weights)')
    p.add_argument('--index', help='index.yaml to update (default: model_zoo/index.yaml)')
    p.add_argument('--input-size', type=int, help="GFLOPs input size (default: the config's data.input_size)")
    p.add_argument('--notes', help='one line shown under the table')
    p.add_argument('--force', action='store_true', help='replace an existing entry of the same name')
    args = p.parse_intermixed_args(argv)
    try:
        entry = export(args.checkpoint, args.name, args.config, _pairs(args.metrics, 'metrics') if args.metrics
                       else None, _pairs(args.published, 'published'), args.ema, args.url_prefix, args.out_dir,
                       args.index, args.force, args.overrides, args.input_size, args.notes)
    except (ExportError, CheckpointError, ConfigError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    except ValueError as exc:  # WeightsMismatchError from models.weights
        print(f'error: {str(exc).splitlines()[0]}', file=sys.stderr)
        return 2
    print(f"exported {args.name}: {entry['file']} sha256 {entry['sha256'][:8]} params {entry['params'] / 1e6:.2f} M "
          f"GFLOPs {entry['gflops']:.3f}; index {index_path(args.index)} and MODEL_ZOO.md updated")
    return 0


if __name__ == '__main__':
    sys.exit(main())
