"""Training checkpoints that survive crashes, full disks and untrusted files.

* :func:`save_checkpoint` writes a temporary file next to the target, flushes and
  fsyncs it, renames it into place with ``os.replace`` and fsyncs the directory:
  a crash, a kill or a full disk at any moment leaves either the old file or the
  new one, never a torn one.
* :func:`load_checkpoint` only ever calls ``torch.load(weights_only=True)``: a
  file that needs code to unpickle is refused (nothing in it runs), and empty,
  truncated or foreign files give a one-line :class:`CheckpointError` naming the file.
* Every checkpoint :func:`save_checkpoint` writes carries a content hash that
  :func:`load_checkpoint` checks; other files are checked by their zip CRC
  (:mod:`engine.integrity`): a flipped bit is refused, never loaded.
* The work directory (``CheckpointManager``, ``check_writable``) is
  :mod:`engine.checkpoint_manager`.

The state dict is saved as plain containers and tensors only (see :func:`to_plain`),
so that everything we write can be read back with ``weights_only=True``.
"""
import collections
import errno
import logging
import os
import re
import socket
import tempfile
import zipfile

import numpy as np
import torch

from engine.integrity import is_sealed, seal, unseal, zip_crc_problem

log = logging.getLogger(__name__)

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


def _why(exc, fix='pick a writable runtime.work_dir'):
    cause = exc
    while cause is not None and not isinstance(cause, OSError):  # torch wraps writer errors in RuntimeError
        cause = cause.__cause__ or cause.__context__
    if cause is not None or 'No space left' in str(exc):
        exc = cause if cause is not None else OSError(errno.ENOSPC, 'No space left on device')
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return 'no space left on device; free some space or lower runtime.keep_last'
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f'permission denied; {fix}'
    if isinstance(exc, OSError):
        return f'{exc.strerror or exc}; {fix}'
    return f'{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""}'


def atomic_write(path, write, fix='pick a writable runtime.work_dir'):
    """Call ``write(fileobj)`` on a temporary file beside ``path``, then rename it into place.

    On any failure the temporary file is removed and ``path`` is left as it was;
    OSError and other exceptions become a one-line :class:`CheckpointError`
    (``fix`` names the setting to change when ``path`` is not writable).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    if os.path.isfile(directory):
        raise CheckpointError(f'could not write {path}: {directory} is a file, not a folder; {fix}')
    try:
        os.makedirs(directory, exist_ok=True)
        tmp = _tmp_path(path)
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(directory)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f'could not write {path}: {_why(exc, fix)} (the previous file, if any, '
                              f'is intact)') from exc
    finally:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass


def save_checkpoint(state, path):
    """Write ``state`` (a dict) to ``path`` atomically, sealed with its content hash.

    See :func:`atomic_write`, :func:`to_plain` and :mod:`engine.integrity`.
    """
    plain = seal(to_plain(state))
    atomic_write(path, lambda f: torch.save(plain, f))
    return os.fspath(path)


# ----------------------------------------------------------------------------- loading

_CODE_MARKERS = ('Unsupported global', 'Unsupported class', 'GLOBAL', 'Trying to call reduce',
                 'Can only create new object')
_FOREIGN = {b'\x89HDF': 'an HDF5 file', b'\x1f\x8b': 'a gzip/tar.gz file', b'\x93NUMPY': 'a numpy .npy file',
            b'PK\x03\x04': 'a zip archive', b'{': 'a JSON/text file', b'<': 'an HTML/XML page'}


def _first_line(exc, limit=300):
    text = str(exc)
    m = re.search(r'WeightsUnpickler error:\s*(.+)', text)
    line = (m.group(1) if m else text).strip().splitlines()
    if not line:
        return type(exc).__name__
    return line[0] if len(line[0]) <= limit else line[0][:limit].rsplit(' ', 1)[0] + ' ...'  # whole words


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
    """Load a checkpoint with ``torch.load(weights_only=True)``; never runs code from the file.

    Its content hash is checked (and removed from the returned state); a file without one is checked
    by its zip CRC. Any failure is a one-line :class:`CheckpointError` naming the file.
    """
    path = os.fspath(path)
    problem = describe_file(path)
    if problem is not None:
        raise CheckpointError(problem)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, KeyError, EOFError, ...
        detail = _first_line(exc)
        if any(m in str(exc) for m in _CODE_MARKERS):
            name = re.search(r'GLOBAL ([\w.]+)', str(exc)) or re.search(r'class ([\w.]+)', str(exc))
            needs = f' (it needs {name.group(1)})' if name else ''
            raise CheckpointError(
                f'refusing to unpickle code from {path}{needs}; it was not saved as plain tensors/containers; '
                f'if you trust it, convert it with `{CONVERT_HINT} {path} OUT.pth`') from None
        newer = re.search(r'file with version (\d+), but the maximum supported version for reading is (\d+)', str(exc))
        if newer:
            raise CheckpointError(f'checkpoint {path} was written by a newer PyTorch (file format version '
                                  f'{newer.group(1)}; this torch {torch.__version__} reads up to {newer.group(2)}): '
                                  f'upgrade torch (pip install -U torch) to read it') from None
        if isinstance(exc, EOFError) or 'EOF' in detail or 'out of input' in detail:
            raise CheckpointError(f'checkpoint {path} is truncated ({detail}): re-copy or re-download it') from None
        raise CheckpointError(f'checkpoint {path} is corrupt or not a PyTorch checkpoint ({detail})') from None
    if is_sealed(state):
        state, problem = unseal(state, path)
    else:  # a foreign file (torchvision's, the originals', a zoo file): only its zip CRC can tell
        problem = zip_crc_problem(path) if zipfile.is_zipfile(path) else None
    if problem is not None:
        raise CheckpointError(problem)
    return state
