"""The work directory's checkpoints: the last K, ``best.pth`` and a ``latest`` pointer.

* :class:`CheckpointManager` keeps ``<work_dir>/checkpoints/``: the last K
  checkpoints, ``best.pth`` (an independent copy), a ``latest`` pointer written
  atomically, and falls back to the newest intact checkpoint when the newest
  cannot be read or fails its integrity check.
* :func:`check_writable` checks a work directory before the first training step.

Each file is written and read with :mod:`engine.checkpoint` (atomic, ``weights_only``).
"""
import collections
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile

import torch

from engine.checkpoint import (CheckpointError, _host, _why, atomic_write, describe_file,
                               load_checkpoint, save_checkpoint)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = 'checkpoints'
LATEST = 'latest'
BEST = 'best.pth'
BEST_META = 'best.json'


# ----------------------------------------------------------------------------- work directory

def check_writable(work_dir, need_bytes=0, files=(), dirs=()):
    """Fail early (before the first step) if ``work_dir`` cannot hold a checkpoint.

    Checks that the names in ``files`` / ``dirs`` (what the run will write there) are
    absent or of that kind, creates ``work_dir`` if needed, writes and removes a probe
    file, and checks that at least ``need_bytes`` are free (pass about twice the
    checkpoint size: the new file is written before the old one is removed).
    """
    work_dir = os.fspath(work_dir)
    if os.path.exists(work_dir) and not os.path.isdir(work_dir):
        raise CheckpointError(f'work_dir {work_dir} is a file, not a directory; pick another runtime.work_dir')
    for names, kind, wrong in ((files, 'file', os.path.isdir), (dirs, 'folder', os.path.isfile)):
        for name in names:
            path = os.path.join(work_dir, name)
            if wrong(path):
                raise CheckpointError(f'{path} is a {"folder" if kind == "file" else "file"} where the run writes '
                                      f'its {name} {kind}; move it away or pick another runtime.work_dir')
    existing = os.path.abspath(work_dir)
    while not os.path.exists(existing):  # before creating anything: a refused run writes nothing
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise CheckpointError(f'work_dir {work_dir} has {_size(free)} free but a checkpoint needs about '
                              f'{_size(need_bytes)}; free some space or pick another runtime.work_dir')
    try:
        os.makedirs(work_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix='.write_probe.', dir=work_dir)
        try:
            os.write(fd, b'ok')
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as exc:
        raise CheckpointError(f'work_dir {work_dir} is not writable: {_why(exc)}') from None
    return free


def _size(n):
    return f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB'


# ----------------------------------------------------------------------------- manager

_TAG = re.compile(r'^(epoch|step)_?(\d+)$')
_SAFE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*$')


def checkpoint_name(tag):
    """'epoch_3' -> 'epoch_003.pth', 'step_1200' -> 'step_0001200.pth', 'final' -> 'final.pth'."""
    tag = str(tag)
    if tag.endswith('.pth'):
        tag = tag[:-4]
    m = _TAG.match(tag)
    if m:
        return f'{m.group(1)}_{int(m.group(2)):0{3 if m.group(1) == "epoch" else 7}d}.pth'
    if not _SAFE.match(tag) or tag in ('best', LATEST):
        raise CheckpointError(f'bad checkpoint tag {tag!r}: use epoch_N, step_N or a plain file-name word')
    return f'{tag}.pth'


def _isfinite_model(state):
    model = state.get('model') if isinstance(state, collections.abc.Mapping) else None
    if not isinstance(model, collections.abc.Mapping):
        return None
    for key, t in model.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return key
    return None


class CheckpointManager:
    """Keeps ``<work_dir>/checkpoints``: last ``keep_last`` checkpoints, ``best.pth`` and a ``latest`` pointer.

    ``save(state, tag, metric)`` writes ``epoch_XXX.pth``/``step_XXXXXXX.pth``
    (holding its ``metric``) atomically, points ``latest`` at it, copies it to
    ``best.pth`` when ``metric`` improves (``mode='max'`` or ``'min'``) or when it
    rewrites best.pth's source with a metric as good, and deletes older checkpoints
    beyond ``keep_last`` (None keeps all). ``best.json`` caches the best metric (and its
    ``metric_name`` when given: ``top1`` for classification, ``bbox_AP`` for detection);
    :meth:`recover_best` rebuilds it from the checkpoints. ``latest()`` returns the
    newest checkpoint that looks readable; ``load_latest()`` loads the newest intact
    one (content hash checked), saying which newer ones it skipped and why.
    """

    def __init__(self, work_dir, keep_last=3, mode='max', check_finite=True, metric_name=None):
        if keep_last is not None and keep_last < 1:
            raise CheckpointError(f'keep_last must be >= 1 or None (keep all), got {keep_last}')
        if mode not in ('max', 'min'):
            raise CheckpointError(f"mode must be 'max' or 'min', got {mode!r}")
        self.dir = os.path.join(os.fspath(work_dir), CHECKPOINT_DIR)
        self.keep_last, self.mode, self.check_finite = keep_last, mode, check_finite
        self.metric_name = metric_name  # recorded in best.json with the metric (e.g. 'top1', 'bbox_AP')
        self.last_saved = None
        self.skipped = []  # why load_latest() passed over newer checkpoints
        self._meta = self._read_best_meta()
        self.best_metric = self._meta.get('metric')
        self.best_source = self._meta.get('file')

    # -- paths
    def path(self, name):
        return os.path.join(self.dir, name)

    @property
    def best_path(self):
        return self.path(BEST) if os.path.isfile(self.path(BEST)) else None

    def checkpoints(self):
        """Regular checkpoint files, oldest first (by modification time, then name)."""
        if not os.path.isdir(self.dir):
            return []
        names = [n for n in os.listdir(self.dir)
                 if n.endswith('.pth') and n != BEST and not n.startswith('.')]
        entries = []
        for n in names:
            try:
                entries.append((os.stat(self.path(n)).st_mtime_ns, n))
            except FileNotFoundError:
                pass
        return [self.path(n) for _, n in sorted(entries)]

    # -- saving
    def save(self, state, tag, metric=None):
        """Save ``state`` as checkpoint ``tag``; returns its path. Raises :class:`CheckpointError`."""
        name = checkpoint_name(tag)
        path = self.path(name)
        if self.check_finite:
            bad = _isfinite_model(state)
            if bad is not None:
                raise CheckpointError(f'not saving {path}: model weight {bad} is not finite (nan/inf); '
                                      f'the last good checkpoint stays {self.last_saved or self.read_pointer()}')
        os.makedirs(self.dir, exist_ok=True)
        self._clean_stale_tmp()
        previous = self.checkpoints()
        if metric is not None and isinstance(state, dict):  # best.json is a cache: each checkpoint knows its metric
            state = {**state, 'metric': float(metric), 'file': name}
        save_checkpoint(state, path)
        self._make_newest(path, previous)
        self.last_saved = path
        atomic_write(self.path(LATEST), lambda f: f.write((name + '\n').encode()))
        if metric is not None and (self._improves(metric) or self._rewrites_best(name, metric)):
            self._save_best(path, name, metric)
        self._prune(keep=path)
        return path

    def _make_newest(self, path, previous):
        """Order is by mtime: make sure ``path`` sorts after every other checkpoint (coarse clocks tie)."""
        others = [p for p in previous if p != path]
        if not others:
            return
        try:
            newest = os.stat(others[-1]).st_mtime_ns
            st = os.stat(path)
            if st.st_mtime_ns <= newest:
                os.utime(path, ns=(st.st_atime_ns, newest + 1_000_000))
        except OSError:
            pass

    def _rewrites_best(self, name, metric):
        """``name`` is best.pth's source file, written again (e.g. after a fallback) with a metric as good."""
        if name != self.best_source:
            return False
        if metric == self.best_metric:
            return True
        log.warning('%s was the best checkpoint (%s) and is now rewritten with %s; best.pth keeps the earlier '
                    'model', name, self.best_metric, metric)
        return False

    def _improves(self, metric):
        if self.best_metric is None:
            return True
        return metric > self.best_metric if self.mode == 'max' else metric < self.best_metric

    def _save_best(self, path, name, metric):
        """Copy ``path`` to ``best.pth`` (atomically): a file of its own, so damage to one never reaches the other."""
        def copy(f):
            with open(path, 'rb') as src:
                shutil.copyfileobj(src, f, 1 << 22)
        atomic_write(self.path(BEST), copy)
        self.best_metric, self.best_source = float(metric), name
        self._meta.update({'file': name, 'metric': float(metric), 'mode': self.mode,
                           **({'metric_name': self.metric_name} if self.metric_name else {})})
        self._write_meta()

    def check_best(self):
        """At the start of a run: verify ``best.pth`` (content hash / zip CRC). A damaged one is restored from the
        checkpoint ``best.json`` names when that one is intact and holds the same metric, else moved aside to
        ``best.pth.damaged`` (the next better epoch writes a new one). Returns a one-line warning, or None."""
        best = self.path(BEST)
        if not os.path.isfile(best):
            return None
        try:
            load_checkpoint(best)
            return None
        except CheckpointError as exc:
            problem = str(exc).splitlines()[0]
        source = self.best_source
        if source and os.path.isfile(self.path(source)):
            try:
                state = load_checkpoint(self.path(source))
                if isinstance(state, dict) and state.get('metric') is not None and \
                        float(state['metric']) == self.best_metric:
                    self._save_best(self.path(source), source, self.best_metric)
                    return f'{best} was damaged ({problem}); restored it from {self.path(source)} (same metric)'
            except CheckpointError:
                pass
        try:
            os.replace(best, best + '.damaged')
        except OSError as exc:
            return f'{best} is damaged ({problem}) and could not be moved aside ({_why(exc)}); remove it'
        metric = f' than {self.best_metric:g}' if self.best_metric is not None else ''
        return (f'{best} is damaged ({problem}) and its source ({source or "unknown"}) is gone or damaged too: moved '
                f'it to best.pth.damaged; the next epoch better{metric} writes a new best.pth')

    def recover_best(self, resumed_best=None):
        """With ``best.json`` missing, take the best metric from the checkpoints (it is only a cache of them).

        The candidates: ``resumed_best`` (the ``best_metric`` stored in the checkpoint resumed from)
        and the metric stored in ``best.pth`` (loaded and checked). Returns the recovered value.
        """
        if self.best_metric is not None:
            return self.best_metric
        found = [(float(resumed_best), None)] if resumed_best is not None else []
        if os.path.isfile(self.path(BEST)):
            try:
                state = load_checkpoint(self.path(BEST))
                if isinstance(state, dict) and state.get('metric') is not None:
                    found.append((float(state['metric']), state.get('file')))
            except CheckpointError as exc:
                log.warning('%s; the best metric is recovered without it', exc)
        if not found:
            return None
        pick = max if self.mode == 'max' else min
        self.best_metric, self.best_source = pick(found, key=lambda f: f[0])
        self._meta.update({'metric': self.best_metric, 'mode': self.mode,
                           **({'file': self.best_source} if self.best_source else {}),
                           **({'metric_name': self.metric_name} if self.metric_name else {})})
        log.warning('%s was missing: best %s recovered from the checkpoints', self.path(BEST_META), self.best_metric)
        try:
            self._write_meta()
        except CheckpointError as exc:
            log.warning('%s', exc)
        return self.best_metric

    def record_best_of(self, metrics, keys=('top1', 'top5')):
        """Keep in best.json the best value of each of ``keys`` over every evaluation, each on its own.

        ED-Net reports 100 - best top-1 and 100 - best top-5, each maximised over epochs
        separately (imagenet_train.py:201-204), so best.pth's top-5 is not enough.
        """
        changed = False
        for key in keys:
            value = metrics.get(key)
            if value is not None and float(value) > self._meta.get(f'best_{key}', float('-inf')):
                self._meta[f'best_{key}'] = float(value)
                changed = True
        if changed:
            self._write_meta()

    def _write_meta(self):
        meta = json.dumps(self._meta, sort_keys=True)
        atomic_write(self.path(BEST_META), lambda f: f.write(meta.encode() + b'\n'))

    def _read_best_meta(self):
        try:
            with open(self.path(BEST_META)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _prune(self, keep):
        if self.keep_last is None:
            return
        ckpts = [p for p in self.checkpoints() if p != keep]
        for old in ckpts[:max(0, len(ckpts) - (self.keep_last - 1))]:
            try:
                os.remove(old)
            except OSError as exc:
                log.warning('could not remove old checkpoint %s: %s', old, _why(exc))

    def _clean_stale_tmp(self):
        """Remove temporary files left by a process of this host that was killed mid-save."""
        for n in os.listdir(self.dir):
            m = re.match(r'^\..*\.(?P<host>[^.]+)\.(?P<pid>\d+)\.tmp$', n)
            if not m or m.group('host') != _host():
                continue
            pid = int(m.group('pid'))
            if pid != os.getpid() and not _alive(pid):
                try:
                    os.remove(self.path(n))
                except OSError:
                    pass

    # -- finding
    def last_good(self):
        """The newest checkpoint a failing run can name: this run's last save, else the ``latest`` pointer."""
        return self.last_saved or self.read_pointer()

    def read_pointer(self):
        """The checkpoint the ``latest`` pointer names (a path), or None."""
        try:
            with open(self.path(LATEST)) as f:
                name = f.read().strip()
        except OSError:
            return None
        if not name or os.sep in name or not _SAFE.match(name):
            return None
        return self.path(name)

    def candidates(self):
        """Checkpoints to resume from, best guess first: the pointer, then newest to oldest."""
        order = list(reversed(self.checkpoints()))
        pointer = self.read_pointer()
        if pointer in order:
            order.remove(pointer)
            order.insert(0, pointer)
        elif pointer is not None:
            log.warning('checkpoint pointer %s names %s, which is missing; looking for older checkpoints',
                        self.path(LATEST), pointer)
        return order

    def latest(self):
        """Newest checkpoint that looks readable, or None; unreadable ones are skipped with a warning."""
        for path in self.candidates():
            problem = quick_check(path)
            if problem is None:
                return path
            log.warning('skipping %s; falling back to an older one', problem)
        return None

    def load_latest(self, map_location='cpu'):
        """``(state, path)`` of the newest checkpoint that loads; ``(None, None)`` when there are none.

        Unreadable ones are skipped; ``self.skipped`` lists why (one line each); if there are checkpoints
        but none of them loads, raises :class:`CheckpointError` rather than
        silently starting from scratch over them.
        """
        candidates, errors = self.candidates(), []
        for path in candidates:
            try:
                state = load_checkpoint(path, map_location)
            except CheckpointError as exc:
                errors.append(str(exc))
                continue
            self.skipped = errors
            return state, path
        if candidates:
            raise CheckpointError(f'none of the {len(candidates)} checkpoints in {self.dir} can be read (newest: '
                                  f'{errors[0]}); move them away to start afresh, or set runtime.auto_resume=false')
        return None, None


def run_checkpoint(path):
    """The checkpoint a work dir, its ``checkpoints/`` folder or a ``latest`` pointer file stands for.

    A work dir means its ``best.pth``, else the newest readable checkpoint (the one the ``latest`` pointer
    names, when intact). Returns None when ``path`` is none of these; raises :class:`CheckpointError`
    for a work dir without checkpoints or a pointer to a missing file.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.basename(path) == LATEST:
        target = CheckpointManager(os.path.dirname(os.path.dirname(os.path.abspath(path)))).read_pointer()
        if target is None or not os.path.isfile(target):
            raise CheckpointError(f'checkpoint pointer {path} names {target or "nothing readable"}, which is '
                                  f'missing; give a checkpoint file of {os.path.dirname(path)}')
        return target
    if not os.path.isdir(path):
        return None
    folder = path if os.path.basename(os.path.normpath(path)) == CHECKPOINT_DIR else os.path.join(path, CHECKPOINT_DIR)
    if not os.path.isdir(folder):
        return None
    manager = CheckpointManager(os.path.dirname(os.path.abspath(folder)))
    found = manager.best_path or manager.latest()
    if found is None:
        raise CheckpointError(f'work dir {path} holds no readable checkpoint in {folder}')
    return found


def quick_check(path):
    """Cheap readability check (no unpickling): None if fine, else why not."""
    problem = describe_file(path)
    if problem is not None:
        return problem
    if not zipfile.is_zipfile(path):
        return None  # legacy (non-zip) torch format: only a full load can tell
    try:
        with zipfile.ZipFile(path) as z:
            if not any(n.endswith('/data.pkl') or n == 'data.pkl' for n in z.namelist()):
                return f'checkpoint {path} is a zip archive without data.pkl, not a torch checkpoint'
    except (zipfile.BadZipFile, OSError) as exc:
        return f'checkpoint {path} is corrupt ({exc})'
    return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
