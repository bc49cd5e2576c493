"""model_zoo/MODEL_ZOO.md made from model_zoo/index.yaml (``python -m tools.zoo_table``; never edited by hand).
"""
import os

from engine.checkpoint import atomic_write
from engine.hub import index_path, load_index

HEADER = """# blocklab model zoo

Generated from `model_zoo/index.yaml` by `python -m tools.zoo_table`; do not edit by hand.
Add a model with `python -m tools.export WORK_DIR/checkpoints/best.pth --name NAME --config CONFIG`.
Evaluate one with `./test.sh CONFIG NAME` (a zoo name, a path or a URL; downloads are checked against the sha256).
Top-1/Top-5 are ImageNet-1k (or the config's dataset) single-crop validation accuracy measured with this code;
"published" is the figure the original paper or repository reports. GFLOPs are multiply-accumulates for one image
at the config's input size (`python -m tools.flops`).

"""
COLUMNS = ('Name', 'Config', 'Top-1', 'Top-5', 'Published top-1', 'Params (M)', 'GFLOPs', 'Weights', 'sha256')


def _num(value, digits=2):
    if value is None or value == '':
        return '-'
    try:
        return f'{float(value):.{digits}f}'
    except (TypeError, ValueError):
        return str(value)


def _row(name, e):
    metrics = e.get('metrics') or {}
    published = e.get('published') or {}
    link = e.get('url') or e.get('file')
    weights = f'[{os.path.basename(link)}]({link})' if link else '-'
    params = e.get('params')
    cells = (name, f'[{e.get("config")}](../{e.get("config")})' if e.get('config') else '-',
             _num(metrics.get('top1')), _num(metrics.get('top5')), _num(published.get('top1')),
             _num(params / 1e6 if isinstance(params, (int, float)) else None), _num(e.get('gflops')),
             weights, f'`{str(e.get("sha256", ""))[:8]}`' if e.get('sha256') else '-')
    return '| ' + ' | '.join(str(c).replace('|', '\\|') for c in cells) + ' |'


def render(models):
    """The whole MODEL_ZOO.md text for ``{name: entry}``."""
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '|'.join(['---'] * 2 + ['---:'] * 5 + ['---'] * 2) + '|']
    lines += [_row(name, e or {}) for name, e in models.items()]
    if not models:
        lines.append('| (no models exported yet) |' + ' |' * (len(COLUMNS) - 1))
    notes = [f'- **{name}**: {e["notes"]}' for name, e in models.items() if isinstance(e, dict) and e.get('notes')]
    return HEADER + '\n'.join(lines) + '\n' + ('\n' + '\n'.join(notes) + '\n' if notes else '')


def table_path(index=None):
    return os.path.join(os.path.dirname(index_path(index)), 'MODEL_ZOO.md')


def write(index=None):
    text = render(load_index(index))
    atomic_write(table_path(index), lambda f: f.write(text.encode()))
    return table_path(index)


def in_sync(index=None):
    path = table_path(index)
    try:
        with open(path) as f:
            return f.read() == render(load_index(index))
    except OSError:
        return False
