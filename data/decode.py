"""Image decoding: the exact PIL path and the fast path that decodes only what a crop needs.

``decode_pil`` is torchvision's ``pil_loader`` (``Image.open(f).convert('RGB')``) on bytes.

``decode_resized_crop`` returns the crop ``box`` (given in full-size pixel coordinates,
so the crop distribution is the caller's alone) resized to ``out_hw`` as a uint8 CHW
tensor, as cheaply as it can:
- when the crop is at least twice the output size, the JPEG is decoded at a reduced
  DCT scale (PIL ``Image.draft``: 1/2, 1/4 or 1/8, never below the output resolution)
  and the box, scaled by the same factor, is resized with sub-pixel precision;
- otherwise ``torchvision.io.decode_jpeg`` decodes the bytes and the crop is resized on
  the uint8 tensor (antialiased bilinear, torch's vectorised uint8 kernel);
- anything that is not a baseline JPEG torchvision can decode falls back to PIL.
Every failure is a :class:`BadImage` carrying a one-line reason.
"""
import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

try:  # deprecated since torchvision 0.29 in favour of TorchCodec; PIL takes over once it is gone
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    decode_jpeg = None

_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class BadImage(Exception):
    """The bytes are not a readable image; ``str(e)`` is the reason."""


def read_bytes(path):
    """The file's bytes as a writable buffer (torch.frombuffer needs one)."""
    with open(path, "rb") as f:
        return bytearray(f.read())


def jpeg_size(data):
    """(width, height) from a JPEG's SOF header without decoding, or None if it is not a JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:                       # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in _SOF:
            h = (data[i + 5] << 8) | data[i + 6]
            w = (data[i + 7] << 8) | data[i + 8]
            return (w, h) if w and h else None
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def decode_pil(data):
    """Decode to an RGB PIL image exactly as torchvision's ImageFolder loader does."""
    try:
        img = Image.open(io.BytesIO(data))
        return img.convert("RGB")
    except _PIL_ERRORS as e:
        raise BadImage(_reason(e)) from None


def pil_to_uint8(img):
    """RGB PIL image -> uint8 CHW tensor (a permuted view of the HWC copy)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def resize_uint8(img, out_hw):
    """Antialiased bilinear resize of a uint8 CHW tensor (torch's uint8 kernel, channels-last fast path)."""
    if tuple(img.shape[-2:]) == tuple(out_hw):
        return img
    return F.interpolate(img.unsqueeze(0), size=tuple(out_hw), mode="bilinear", antialias=True,
                         align_corners=False)[0]


def draft_factor(box_hw, out_hw):
    """Largest JPEG DCT reduction (8, 4, 2 or 1) that keeps the crop at least ``out_hw``."""
    for s in (8, 4, 2):
        if box_hw[0] >= s * out_hw[0] and box_hw[1] >= s * out_hw[1]:
            return s
    return 1


def decode_resized_crop(data, size, box, out_hw):
    """Crop ``box`` = (top, left, height, width) of an image of ``size`` = (width, height), resized to out_hw."""
    top, left, h, w = box
    s = draft_factor((h, w), out_hw)
    if s > 1:
        out = _draft_crop(data, size, box, out_hw, s)
        if out is not None:
            return out
    full = None
    if decode_jpeg is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                full = decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:                  # CMYK, exotic or corrupt files: PIL decides below
            full = None
    if full is None:
        full = pil_to_uint8(decode_pil(data))
    if tuple(full.shape[-2:]) != (size[1], size[0]):
        raise BadImage(f"decoded size {tuple(full.shape[-2:])[::-1]} differs from the header's {size}")
    return resize_uint8(full[:, top:top + h, left:left + w], out_hw)


def _draft_crop(data, size, box, out_hw, s):
    top, left, h, w = box
    try:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (size[0] // s, size[1] // s))
        if img.size != (-(-size[0] // s), -(-size[1] // s)):   # not scaled by exactly s (e.g. not a JPEG)
            return None
        f = 1.0 / s                          # libjpeg scales every 8x8 block to (8/s)x(8/s)
        img = img.convert("RGB")
        img = img.resize((out_hw[1], out_hw[0]), Image.BILINEAR,
                         box=(left * f, top * f, min((left + w) * f, img.size[0]), min((top + h) * f, img.size[1])))
    except _PIL_ERRORS as e:
        raise BadImage(_reason(e)) from None
    return pil_to_uint8(img)


def _reason(e):
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image format PIL can identify"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}".rstrip(": ")
