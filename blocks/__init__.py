"""Plug-in blocks and conv types, registered by the names configs use.

Importing this package registers every built-in block; a new block is one
module here plus an import line below (see README, "Adding a block").
"""
import importlib

from .registry import BLOCKS, CONVS, get_block, get_conv, register_block, register_conv  # noqa: F401
from .conv import ConvFactory  # noqa: F401

for _name in ("se", "ce", "ed", "we"):
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as e:  # a block module not written yet must not hide other errors
        if e.name != f"{__name__}.{_name}":
            raise
