"""Training checkpoints that survive crashes, full disks and untrusted files.

* :func:`save_checkpoint` writes a temporary file next to the target, flushes and
  fsyncs it, renames it into place with ``os.replace`` and fsyncs the directory:
  a crash, a kill or a full disk at any moment leaves either the old file or the
  new one, never a torn one.
* :func:`load_checkpoint` only ever calls ``torch.load(weights_only=True)``: a
  file that needs code to unpickle is refused (nothing in it runs), and empty,
  truncated or foreign files give a one-line :class:`CheckpointError` naming the file.
* :class:`CheckpointManager` keeps ``<work_dir>/checkpoints/``: the last K
  checkpoints, ``best.pth``, a ``latest`` pointer written atomically, and falls
  back to the previous good checkpoint when the newest cannot be read.
* :func:`check_writable` checks a work directory before the first training step.

The state dict is saved as plain containers and tensors only (see :func:`to_plain`),
so that everything we write can be read back with ``weights_only=True``.
"""
import collections
import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import zipfile

import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINT_DIR = 'checkpoints'
LATEST = 'latest'
BEST = 'best.pth'
BEST_META = 'best.json'
# Test hook for tools/fault_inject.py: seconds to sleep between writing the
# temporary file and renaming it into place, so that a kill can land there.
FAULT_SLEEP_ENV = 'BLOCKLAB_FAULT_SLEEP_IN_SAVE'
CONVERT_HINT = 'python -m tools.convert_pickle --trust'


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message is one line naming the file."""


# ----------------------------------------------------------------------------- plain state

_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray,
           torch.Tensor, torch.Size, torch.dtype, torch.device)


def to_plain(obj, where='state'):
    """Return ``obj`` as containers ``weights_only`` loading accepts.

    Mapping subclasses (e.g. a ``Config``) become dicts (OrderedDict is kept),
    namedtuples become tuples, numpy scalars become Python numbers and numpy
    arrays become tensors. Anything else (a module, a lambda, a custom class)
    raises :class:`CheckpointError` naming where it sits in the state.
    """
    if isinstance(obj, np.generic):  # before the leaves: np.float64 is a float subclass
        return obj.item()
    if isinstance(obj, _LEAVES):
        return obj
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, to_plain(v, f'{where}[{k!r}]')) for k, v in obj.items())
    if isinstance(obj, collections.abc.Mapping):
        return {to_plain(k, where): to_plain(v, f'{where}[{k!r}]') for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f'{where}[{i}]') for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, (set, frozenset)):
        return {to_plain(v, where) for v in obj}
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    raise CheckpointError(
        f'cannot save {where} of type {type(obj).__module__}.{type(obj).__qualname__}: '
        'checkpoints hold only tensors, numbers, strings and containers (call .state_dict() '
        'or convert it) so that they load back with weights_only=True')


def state_nbytes(obj):
    """Bytes of all tensors in a (nested) state: a lower bound on its checkpoint size."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, collections.abc.Mapping):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


# ----------------------------------------------------------------------------- atomic writes

def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, or a filesystem that does not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _host():
    return re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname().split('.')[0]) or 'host'


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def _tmp_path(path):
    """A new empty file ``.<name>.<random>.<host>.<pid>.tmp`` beside ``path`` (normal file permissions)."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix=f'.{_host()}.{os.getpid()}.tmp', dir=directory)
    os.close(fd)
    os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600 files; a checkpoint should be as readable as any file
    return tmp


def _why(exc):
    cause = exc
    while cause is not None and not isinstance(cause, OSError):  # torch wraps writer errors in RuntimeError
        cause = cause.__cause__ or cause.__context__
    if cause is not None or 'No space left' in str(exc):
        exc = cause if cause is not None else OSError(errno.ENOSPC, 'No space left on device')
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return 'no space left on device; free some space or lower runtime.keep_last'
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return 'permission denied; pick a writable runtime.work_dir'
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return f'{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""}'


def atomic_write(path, write):
    """Call ``write(fileobj)`` on a temporary file beside ``path``, then rename it into place.

    On any failure the temporary file is removed and ``path`` is left as it was;
    OSError and other exceptions become a one-line :class:`CheckpointError`.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        tmp = _tmp_path(path)
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        delay = float(os.environ.get(FAULT_SLEEP_ENV) or 0)
        if delay > 0:
            time.sleep(delay)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(directory)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f'could not write {path}: {_why(exc)} (the previous file, if any, is intact)') from exc
    finally:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass


def save_checkpoint(state, path):
    """Write ``state`` (a dict) to ``path`` atomically; see :func:`atomic_write` and :func:`to_plain`."""
    plain = to_plain(state)
    atomic_write(path, lambda f: torch.save(plain, f))
    return os.fspath(path)


# ----------------------------------------------------------------------------- loading

_CODE_MARKERS = ('Unsupported global', 'Unsupported class', 'GLOBAL', 'Trying to call reduce',
                 'Can only create new object')
_FOREIGN = {b'\x89HDF': 'an HDF5 file', b'\x1f\x8b': 'a gzip/tar.gz file', b'\x93NUMPY': 'a numpy .npy file',
            b'PK\x03\x04': 'a zip archive', b'{': 'a JSON/text file', b'<': 'an HTML/XML page'}


def _first_line(exc):
    text = str(exc)
    m = re.search(r'WeightsUnpickler error:\s*(.+)', text)
    line = (m.group(1) if m else text).strip().splitlines()
    return line[0][:200] if line else type(exc).__name__


def describe_file(path):
    """One-line reason why ``path`` cannot be a checkpoint, naming it; None when torch.load must decide."""
    what = _describe(path)
    if what is None or what.startswith('refusing'):
        return what
    return f'checkpoint {path} {what}'


def _describe(path):
    if not os.path.exists(path):
        return 'not found'
    if os.path.isdir(path):
        return 'is a directory, not a checkpoint file'
    size = os.path.getsize(path)
    if size == 0:
        return 'is empty (0 bytes): it was cut off while being written or copied'
    with open(path, 'rb') as f:
        head = f.read(8)
    if head.startswith(b'PK'):
        if not zipfile.is_zipfile(path):
            return f'is truncated or corrupt (incomplete zip archive, {size} bytes): re-copy or re-download it'
        return None
    if head.startswith(_LEGACY_MAGIC):  # torch.save(..., _use_new_zipfile_serialization=False)
        return None
    if head[:1] == b'\x80' or (head[:1] in b'(}]cNIFSVL' and _ends_with_stop(path)):
        protocol = head[1] if head[:1] == b'\x80' and len(head) > 1 else 0
        return (f'refusing to unpickle code from {path}: it is a plain Python pickle (protocol {protocol}), not a '
                f'torch.save checkpoint of plain tensors/containers; if you trust it, convert it with '
                f'`{CONVERT_HINT} {path} OUT.pth`')
    if len(head) == 8 and int.from_bytes(head, 'little') < size and _looks_safetensors(path):
        return 'is a safetensors file, not a torch checkpoint: load it with safetensors.torch.load_file'
    for magic, what in _FOREIGN.items():
        if head.startswith(magic):
            return f'is {what}, not a PyTorch checkpoint'
    return f'is not a PyTorch checkpoint (starts with {head[:8]!r})'


# PROTO 2, LONG1 10 bytes: the magic number torch's legacy (non-zip) format pickles first
_LEGACY_MAGIC = b'\x80\x02\x8a\x0a'


def _ends_with_stop(path):
    with open(path, 'rb') as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b'.'


def _looks_safetensors(path):
    with open(path, 'rb') as f:
        f.read(8)
        return f.read(1) == b'{'


def load_checkpoint(path, map_location='cpu'):
    """Load a checkpoint with ``torch.load(weights_only=True)``; never runs code from the file."""
    path = os.fspath(path)
    problem = describe_file(path)
    if problem is not None:
        raise CheckpointError(problem)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, KeyError, EOFError, ...
        detail = _first_line(exc)
        if any(m in str(exc) for m in _CODE_MARKERS):
            name = re.search(r'GLOBAL ([\w.]+)', str(exc)) or re.search(r'class ([\w.]+)', str(exc))
            needs = f' (it needs {name.group(1)})' if name else ''
            raise CheckpointError(
                f'refusing to unpickle code from {path}{needs}; it was not saved as plain tensors/containers; '
                f'if you trust it, convert it with `{CONVERT_HINT} {path} OUT.pth`') from None
        if isinstance(exc, EOFError) or 'EOF' in detail or 'out of input' in detail:
            raise CheckpointError(f'checkpoint {path} is truncated ({detail}): re-copy or re-download it') from None
        raise CheckpointError(f'checkpoint {path} is corrupt or not a PyTorch checkpoint ({detail})') from None


# ----------------------------------------------------------------------------- work directory

def check_writable(work_dir, need_bytes=0):
    """Fail early (before the first step) if ``work_dir`` cannot hold a checkpoint.

    Creates ``work_dir`` if needed, writes and removes a probe file, and checks
    that at least ``need_bytes`` are free (pass about twice the checkpoint size:
    the new file is written before the old one is removed).
    """
    work_dir = os.fspath(work_dir)
    if os.path.exists(work_dir) and not os.path.isdir(work_dir):
        raise CheckpointError(f'work_dir {work_dir} is a file, not a directory; pick another runtime.work_dir')
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
    free = shutil.disk_usage(work_dir).free
    if free < need_bytes:
        raise CheckpointError(f'work_dir {work_dir} has {free / 2**30:.2f} GiB free but a checkpoint needs about '
                              f'{need_bytes / 2**30:.2f} GiB; free some space or pick another runtime.work_dir')
    return free


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
    atomically, points ``latest`` at it, refreshes ``best.pth`` when ``metric``
    improves (``mode='max'`` or ``'min'``) and deletes older checkpoints beyond
    ``keep_last`` (None keeps all). ``latest()`` returns the newest readable
    checkpoint, warning about and skipping unreadable ones; ``load_latest()``
    also loads it, falling back further if loading fails.
    """

    def __init__(self, work_dir, keep_last=3, mode='max', check_finite=True):
        if keep_last is not None and keep_last < 1:
            raise CheckpointError(f'keep_last must be >= 1 or None (keep all), got {keep_last}')
        if mode not in ('max', 'min'):
            raise CheckpointError(f"mode must be 'max' or 'min', got {mode!r}")
        self.dir = os.path.join(os.fspath(work_dir), CHECKPOINT_DIR)
        self.keep_last, self.mode, self.check_finite = keep_last, mode, check_finite
        self.last_saved = None
        meta = self._read_best_meta()
        self.best_metric = meta.get('metric')
        self.best_source = meta.get('file')

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
        save_checkpoint(state, path)
        self._make_newest(path, previous)
        self.last_saved = path
        atomic_write(self.path(LATEST), lambda f: f.write((name + '\n').encode()))
        if metric is not None and self._improves(metric):
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

    def _improves(self, metric):
        if self.best_metric is None:
            return True
        return metric > self.best_metric if self.mode == 'max' else metric < self.best_metric

    def _save_best(self, path, name, metric):
        best = self.path(BEST)
        link = os.path.join(self.dir, f'.{BEST}.link.{_host()}.{os.getpid()}.tmp')
        try:  # a hard link costs no I/O; os.replace makes it appear atomically
            if os.path.lexists(link):
                os.remove(link)
            os.link(path, link)
            os.replace(link, best)
            _fsync_dir(self.dir)
        except OSError:  # filesystems without hard links: copy
            if os.path.lexists(link):
                os.remove(link)

            def copy(f):
                with open(path, 'rb') as src:
                    shutil.copyfileobj(src, f, 1 << 22)
            atomic_write(best, copy)
        self.best_metric, self.best_source = float(metric), name
        meta = json.dumps({'file': name, 'metric': float(metric), 'mode': self.mode})
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

        Unreadable checkpoints are skipped with a warning; if there are checkpoints
        but none of them loads, raises :class:`CheckpointError` rather than
        silently starting from scratch over them.
        """
        candidates, errors = self.candidates(), []
        for path in candidates:
            try:
                return load_checkpoint(path, map_location), path
            except CheckpointError as exc:
                errors.append(str(exc))
                log.warning('%s; falling back to an older checkpoint', exc)
        if candidates:
            raise CheckpointError(f'none of the {len(candidates)} checkpoints in {self.dir} can be read (newest: '
                                  f'{errors[0]}); move them away to start afresh, or set runtime.auto_resume=false')
        return None, None


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
