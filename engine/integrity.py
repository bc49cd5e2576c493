"""Checkpoints that prove their integrity: a content hash inside every file we write, the zip CRC for others.

torch's reader never checks the zip's CRC, so one flipped bit in a tensor loads
silently. :func:`seal` adds ``state['integrity'] = {'scheme', 'sha256'}``: the
sha256 of the whole state in a fixed order (every key, every number and string,
each tensor's dtype, shape and bytes), excluding the ``integrity`` entry itself.
:func:`unseal` recomputes it on load and removes the entry. A file without one
(torchvision's, the original repositories', our model-zoo files, which carry
their sha256 in their name and the zoo index) is checked by the zip members'
CRC32 instead (:func:`zip_crc_problem`; about 0.08 s for a ResNet-50 file).
"""
import collections
import hashlib
import struct
import zipfile

import torch

KEY = 'integrity'
SCHEME = 'blocklab-sha256-v1'


def _feed(h, obj):
    """Hash ``obj`` with a type tag before every item, so that different structures never hash alike."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
        h.update(f'T{t.dtype}{tuple(obj.shape)}'.encode())
        h.update(t.view(torch.uint8).numpy())
    elif isinstance(obj, collections.abc.Mapping):
        h.update(b'D' + struct.pack('<q', len(obj)))
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update((b'L' if isinstance(obj, list) else b'U') + struct.pack('<q', len(obj)))
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, (set, frozenset)):
        h.update(b'S' + struct.pack('<q', len(obj)))
        for item in sorted(obj, key=repr):
            _feed(h, item)
    elif isinstance(obj, (bytes, bytearray)):
        h.update(b'B' + struct.pack('<q', len(obj)) + bytes(obj))
    elif isinstance(obj, str):
        data = obj.encode('utf-8', 'surrogatepass')
        h.update(b's' + struct.pack('<q', len(data)) + data)
    else:  # None, bool, int, float, complex, torch.Size/dtype/device: repr is exact and round-trips
        text = f'{type(obj).__name__}:{obj!r}'.encode()
        h.update(b'v' + struct.pack('<q', len(text)) + text)


def content_hash(state):
    """sha256 (hex) of ``state`` without its ``integrity`` entry."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != KEY})
    return h.hexdigest()


def seal(state):
    """``state`` (a dict) with its content hash added; other objects are returned as they are."""
    if not isinstance(state, collections.abc.Mapping):
        return state
    out = type(state)((k, v) for k, v in state.items() if k != KEY)
    out[KEY] = {'scheme': SCHEME, 'sha256': content_hash(out)}
    return out


def is_sealed(state):
    seal_ = state.get(KEY) if isinstance(state, collections.abc.Mapping) else None
    return isinstance(seal_, collections.abc.Mapping) and seal_.get('scheme') == SCHEME


def unseal(state, path):
    """Check a loaded state's hash and return it without the ``integrity`` entry.

    Returns ``(state, problem)``: ``problem`` is None, or one line naming ``path``
    when the hash does not match. States without a seal are returned unchanged.
    """
    if not is_sealed(state):
        return state, None
    expected = str(state[KEY].get('sha256'))
    state = type(state)((k, v) for k, v in state.items() if k != KEY)
    actual = content_hash(state)
    if actual != expected:
        return state, (f'checkpoint {path} fails its integrity check (content sha256 {actual[:12]}... but it was '
                       f'saved as {expected[:12]}...): it was corrupted after it was written (a flipped bit, a bad '
                       f'copy); use another checkpoint or re-copy it')
    return state, None


def zip_crc_problem(path):
    """None when every member of the zip at ``path`` matches its CRC32, else one line naming the file."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        return f'checkpoint {path} is corrupt ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})'
    if bad is not None:
        return (f'checkpoint {path} is corrupt: member {bad} fails its zip CRC check (a flipped bit or a bad copy); '
                f're-copy or re-download it')
    return None
