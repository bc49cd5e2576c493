"""Find a checkpoint by path, model-zoo name or URL, and verify what was downloaded.

``resolve_checkpoint(spec)`` returns a local file for

* an existing path; a work dir (its ``best.pth``, else its newest readable
  checkpoint) or a ``checkpoints/latest`` pointer file stand for that checkpoint;
* a name in ``model_zoo/index.yaml`` (its ``file``, relative to the index, or its ``url``);
* a URL (``http(s)://``, ``file://``), downloaded once into the cache
  (``$BLOCKLAB_CACHE`` or ``~/.cache/blocklab``) through a temporary file.

The cache is content-addressed: a URL's file lives under a folder named by the
sha256 of the whole URL (``checkpoints/<sha256(url)[:16]>/<name>``), so two URLs
that end in the same file name (``.../A/best.pth``, ``.../B/best.pth``) never
share a cached file.

Downloads and zoo files are checked against a sha256: the index entry's, a
``#sha256=<hex>`` URL fragment, or the ``-<sha256[:8]>`` in the file name
(torchvision's convention). A mismatch deletes the file and raises :class:`HubError`.
"""
import hashlib
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request

import yaml

from core.names import nearest
from engine.checkpoint import CheckpointError, atomic_write, describe_file
from engine.checkpoint_manager import run_checkpoint

log = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_INDEX = os.path.join(REPO_ROOT, 'model_zoo', 'index.yaml')
_HASH_IN_NAME = re.compile(r'-([0-9a-f]{8,64})\.(?:pth|pt|pth\.tar|ckpt|bin)$')
_URL = re.compile(r'^(https?|file|ftp)://', re.I)


class HubError(CheckpointError):
    """A checkpoint that cannot be found, downloaded or verified; one line naming the spec."""


def cache_dir(path=None):
    """Where downloads go: ``path``, else ``$BLOCKLAB_CACHE``, else ``~/.cache/blocklab``."""
    path = path or os.environ.get('BLOCKLAB_CACHE') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'blocklab')
    return os.path.join(os.path.abspath(os.path.expanduser(path)), 'checkpoints')


def sha256_file(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def hash_from_name(name):
    """'resnet50-0676ba61.pth' -> '0676ba61' (None when the name carries no hash)."""
    m = _HASH_IN_NAME.search(os.path.basename(name))
    return m.group(1) if m else None


# ----------------------------------------------------------------------------- model zoo index

def index_path(index=None):
    return os.path.abspath(index or os.environ.get('BLOCKLAB_ZOO_INDEX') or DEFAULT_INDEX)


def load_index(index=None):
    """``{name: entry}`` from the zoo index (an empty dict when it does not exist)."""
    path = index_path(index)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise HubError(f'model zoo index {path} is not valid YAML: {str(exc).splitlines()[0]}') from None
    models = data.get('models') if isinstance(data, dict) else None
    if models is None:
        return {}
    if not isinstance(models, dict):
        raise HubError(f'model zoo index {path}: `models` must be a mapping of name -> entry')
    return models


def save_index(models, index=None):
    """Write the index atomically (entries in the given order)."""
    text = ('# blocklab model zoo: one entry per published checkpoint. Written by tools/export.py;\n'
            '# model_zoo/MODEL_ZOO.md is generated from it (python -m tools.zoo_table).\n')
    text += yaml.safe_dump({'models': models}, sort_keys=False, default_flow_style=False, width=120)
    atomic_write(index_path(index), lambda f: f.write(text.encode()))


# ----------------------------------------------------------------------------- verification

def verify(path, expected, source=None):
    """Check ``path`` against a full sha256 or a prefix of one; on mismatch delete it and raise."""
    if not expected:
        return
    expected = str(expected).lower()
    actual = sha256_file(path)
    if not actual.startswith(expected):
        try:
            os.remove(path)
        except OSError:
            pass
        raise HubError(f'sha256 mismatch for {source or path}: expected {expected[:16]}..., got {actual[:16]}...; '
                       f'the file was deleted and will not be used (re-download it or fix the index)')


def _split_fragment(url):
    base, _, frag = url.partition('#')
    m = re.match(r'^sha256=([0-9a-fA-F]{8,64})$', frag)
    return base, (m.group(1).lower() if m else None)


def cache_path(url, cache=None):
    """Where ``url`` (without its ``#`` fragment) is cached: a folder per URL, keyed by its sha256."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or 'download.pth'
    key = hashlib.sha256(url.encode('utf-8')).hexdigest()[:16]
    return os.path.join(cache_dir(cache), key, name)


def download(url, cache=None, expected=None, progress=False):
    """Download ``url`` into the cache (once) and return the local path, verified against ``expected``."""
    url, frag_hash = _split_fragment(url)
    dst = cache_path(url, cache)
    name = os.path.basename(dst)
    expected = (expected or frag_hash or hash_from_name(name) or '').lower() or None
    if os.path.isfile(dst):
        try:
            verify(dst, expected, dst)
            problem = _unusable(dst)
            if problem is None:
                return dst
            log.warning('%s; moved it to %s and downloading it again', problem, _move_aside(dst))
        except HubError as exc:
            log.warning('%s; downloading it again', exc)
    if expected is None:
        log.warning('no sha256 known for %s (not in the zoo index, no -<hash> in its name): it is not verified', url)

    def fetch(f):
        h = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                total, done = int(r.headers.get('Content-Length') or 0), 0
                for block in iter(lambda: r.read(1 << 20), b''):
                    f.write(block)
                    h.update(block)
                    done += len(block)
                    if progress and total:
                        print(f'\rdownloading {name}: {100 * done // total}%', end='', flush=True)
            if progress and total:
                print()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, 'reason', None) or exc
            raise HubError(f'could not download {url}: {reason}') from None
        if expected is not None and not h.hexdigest().startswith(expected):
            raise HubError(f'sha256 mismatch for {url}: expected {expected[:16]}..., got {h.hexdigest()[:16]}...; '
                           'the download was deleted and will not be used')

    # atomic_write removes the temporary file whenever fetch raises: nothing unverified is kept
    try:
        atomic_write(dst, fetch, fix='set BLOCKLAB_CACHE to a writable folder')
    except CheckpointError:
        try:
            os.rmdir(os.path.dirname(dst))  # the URL's folder, when nothing else is in it
        except OSError:
            pass
        raise
    problem = _unusable(dst)
    if problem is not None:
        raise HubError(f'{url} sent an unusable file ({problem}; moved to {_move_aside(dst)}); check the URL or the '
                       'server, then run again: it is downloaded again')
    return dst


def _unusable(path):
    """Why a downloaded file cannot be a checkpoint (an HTML error page, cut off, empty), or None.

    A file without a known sha256 is only checked by this: without it a bad download would stay cached."""
    problem = describe_file(path)
    return None if problem is None or problem.startswith('refusing') else problem


def _move_aside(path):
    """Keep a bad download for inspection, out of the cache's way (``<name>.bad``); returns its new path."""
    aside = f'{path}.bad'
    os.replace(path, aside)
    return aside


# ----------------------------------------------------------------------------- resolve

def resolve_checkpoint(spec, cache_dir=None, index=None, progress=False):
    """Local path for a path, model-zoo name or URL; see the module docstring."""
    spec = os.fspath(spec)
    if _URL.match(spec):
        base, _ = _split_fragment(spec)
        entry = next((e for e in load_index(index).values() if isinstance(e, dict) and e.get('url') == base), None)
        return download(spec, cache_dir, entry.get('sha256') if entry else None, progress)
    path = os.path.expanduser(spec)
    if os.path.exists(path):
        found = run_checkpoint(path)
        if found is not None:
            return found
        if os.path.isdir(path):
            raise HubError(f'checkpoint {spec} is a directory without checkpoints/; give a .pth file or a work dir')
        return path
    models = load_index(index)
    if spec in models:
        return _resolve_entry(spec, models[spec], cache_dir, index, progress)
    looks_like_path = os.sep in spec or spec.endswith(('.pth', '.pt', '.tar', '.ckpt'))
    hint = nearest(spec, models)
    if looks_like_path:
        raise HubError(f'checkpoint {spec} not found (no such file)')
    known = ', '.join(sorted(models)[:8]) or 'none yet'
    raise HubError(f'checkpoint {spec!r} is not a file, a URL or a model-zoo name'
                   + (f'; did you mean {hint!r}?' if hint else f' (zoo names: {known})'))


def _resolve_entry(name, entry, cache, index, progress):
    if not isinstance(entry, dict):
        raise HubError(f'model zoo entry {name!r} in {index_path(index)} is not a mapping')
    sha = entry.get('sha256')
    if entry.get('file'):
        local = os.path.join(os.path.dirname(index_path(index)), entry['file'])
        if os.path.isfile(local):
            verify(local, sha or hash_from_name(local), f'model zoo entry {name!r} ({local})')
            return local
    if entry.get('url'):
        return download(entry['url'], cache, sha, progress)
    raise HubError(f'model zoo entry {name!r} has no url and its file {entry.get("file")!r} is missing; '
                   f'export it again with tools/export.py or add a url')
