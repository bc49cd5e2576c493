"""What a deployed classifier needs besides its weights: its eval preprocessing and class names.

A training checkpoint holds the resolved config (``config``) and, when the dataset names its classes
(image folders: the folder names; CIFAR and digits: their label names), ``classes``: a list of
strings, index = label. :meth:`Preprocessing.from_checkpoint` reads both; exported files carry the
same fields as string metadata (:meth:`Preprocessing.metadata`, keys ``blocklab.*``: ONNX
``metadata_props``, a ``FILE.json`` sidecar for TorchScript / torch.export), read back by
:meth:`Preprocessing.from_metadata`.

:meth:`Preprocessing.load` reads image files as ./test.sh evaluates an image folder (``FileEval``: PIL
decode to RGB, shorter side resized to ``eval_resize`` when set, centre crop ``input_size``; models of
in-memory datasets without ``eval_resize`` (CIFAR, digits) get the image resized to input_size x
input_size, as ``ArrayEval`` does), then ``x / 255`` and ``(x - mean) / std`` per RGB channel
(``DeviceTransform``): an NCHW float32 batch.
"""
import json
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .decode import BadImage, decode_pil, pil_to_uint8, read_bytes, resize_uint8
from .errors import DataError
from .recipe import build_recipe
from .transforms import DeviceTransform, FileEval

LAYOUT = "NCHW float32, RGB, uint8 / 255 then (x - mean) / std"
PREFIX = "blocklab."
IN_MEMORY = ("cifar10", "cifar100", "digits", "synthetic")


@dataclass(frozen=True)
class Preprocessing:
    input_size: int
    eval_resize: Optional[int]      # shorter side before the centre crop; None: no resize
    resize_square: bool             # no eval_resize: resize to input_size^2 (in-memory datasets) instead of crop
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    classes: Optional[Tuple[str, ...]] = None

    @classmethod
    def from_config(cls, data_cfg, classes=None):
        recipe = build_recipe(data_cfg)
        return cls(recipe.input_size, recipe.eval_resize, recipe.eval_resize is None and recipe.dataset in IN_MEMORY,
                   recipe.mean, recipe.std, tuple(classes) if classes else None)

    @classmethod
    def from_checkpoint(cls, state, where):
        """From a training checkpoint's dict (its ``config`` and ``classes``); DataError if it has no config."""
        if not (isinstance(state, dict) and isinstance(state.get("config"), dict)):
            raise DataError(f"{where} holds no config (not a blocklab training checkpoint); give the config with "
                            f"--config, or predict with an exported ONNX file")
        return cls.from_config(state["config"]["data"], state.get("classes"))

    def metadata(self):
        """The fields as ``{'blocklab.<key>': str}`` (JSON values), for ONNX metadata_props or a sidecar."""
        fields = {"input_size": self.input_size, "eval_resize": self.eval_resize, "resize_square": self.resize_square,
                  "mean": list(self.mean), "std": list(self.std), "layout": LAYOUT,
                  "classes": list(self.classes) if self.classes else None}
        return {PREFIX + k: json.dumps(v) for k, v in fields.items()}

    @classmethod
    def from_metadata(cls, props, where):
        try:
            get = {k[len(PREFIX):]: json.loads(v) for k, v in props.items() if k.startswith(PREFIX)}
            return cls(int(get["input_size"]), get["eval_resize"], bool(get["resize_square"]),
                       tuple(get["mean"]), tuple(get["std"]), tuple(get["classes"]) if get["classes"] else None)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where} has no blocklab preprocessing metadata ({type(e).__name__}: {e}); "
                            f"export it again with python -m tools.deploy") from None

    def describe(self):
        resize = (f"shorter side {self.eval_resize}, centre crop {self.input_size}" if self.eval_resize else
                  f"resize to {self.input_size}x{self.input_size}" if self.resize_square else
                  f"centre crop {self.input_size}")
        names = f"{len(self.classes)} class names" if self.classes else "no class names"
        return (f"input {self.input_size}x{self.input_size} ({resize}), {LAYOUT}, mean {list(self.mean)}, "
                f"std {list(self.std)}, {names}")

    def load(self, paths):
        """The images at ``paths`` as one normalised NCHW float32 batch; DataError names an unreadable file."""
        crop = FileEval(self)
        batch = []
        for path in paths:
            try:
                data = read_bytes(path)
                if self.resize_square:
                    batch.append(resize_uint8(pil_to_uint8(decode_pil(data)), (self.input_size,) * 2))
                else:
                    batch.append(crop(data))
            except (OSError, BadImage) as e:
                raise DataError(f"cannot read image {path}: {e}; give image files (JPEG, PNG, ...)") from None
        return DeviceTransform(self.mean, self.std)(torch.stack(batch))
