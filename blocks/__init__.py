"""Plug-in blocks and conv types, registered by the names configs use.

Importing this package registers every built-in block; a new block is one
module here plus an import line below (see docs/contributing.md, "Adding a block").
"""
from .registry import BLOCKS, CONVS, Block, get_block, get_conv, register_block, register_conv  # noqa: F401
from .conv import ConvFactory  # noqa: F401
from . import ce, ed, se, we  # noqa: F401,E402  (registers the built-in blocks)
