"""Name -> class registries for plug-in blocks and conv types, and their option declarations.

Configs name blocks (``{type: ce}``) and convs (``conv: {type: we}``); the
backbones look them up here. A block is an ``nn.Module`` built as
``cls(channels, **options)``; its keyword arguments are its config options, so
the config loader can refuse unknown options by introspecting the signature.
Beside its constructor every block and conv declares what each option accepts and
means, ``OPTIONS = {name: Option(...)}``; registering a class whose declarations and
keyword arguments differ fails, so no option reaches a model unchecked. docs/blocks.md is
generated from these declarations (``python -m models.block_docs``).
"""
import inspect
import logging
import math
from dataclasses import dataclass

import torch.nn as nn

from core.names import did_you_mean

BLOCKS = {}
CONVS = {}
POSITIONS = ("after_norm", "parallel")
# conv constructor arguments the backbone passes (not config options)
CONV_CALL_ARGS = frozenset({"stride", "padding", "groups", "bias", "dilation", "padding_mode", "device", "dtype"})


@dataclass(frozen=True)
class Option:
    """What one block/conv option accepts: ``type`` (bool, int, float or list), an inclusive
    range ``[low, high]`` for numbers (``low_open``: low itself excluded), or ``choices``
    (for a list, the choices of its items). Floats must be finite; int is accepted for float.
    ``nullable``: null is accepted too (the block then picks the value). ``requires``: the bool option
    that must be true for this one to act (set while it is false, it would be ignored: refused).
    ``doc``: what the option means, for docs/blocks.md.
    """
    type: type
    low: float = None
    high: float = None
    low_open: bool = False
    choices: tuple = None
    nullable: bool = False
    requires: str = None
    doc: str = ""

    def allowed(self):
        """The accepted values in words, e.g. 'an integer >= 1' or 'a number in [0, 1]'."""
        if self.nullable and self.choices is None:
            return self._allowed() + " or null"
        return self._allowed()

    def _allowed(self):
        if self.type is list:
            return f"a list of {', '.join(map(str, self.choices))}" if self.choices else "a list"
        if self.choices is not None:
            return "one of " + ", ".join("null" if c is None else repr(c) for c in self.choices)
        what = {bool: "true or false", int: "an integer", float: "a number"}[self.type]
        if self.low is not None and self.high is not None:
            return f"{what} in {'(' if self.low_open else '['}{self.low}, {self.high}]"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {self.low}"
        return what

    def accepts(self, value):
        if value is None and self.nullable:
            return True
        if self.type is list:
            return isinstance(value, (list, tuple)) and (
                self.choices is None or all(isinstance(x, str) and x in self.choices for x in value))
        if self.choices is not None:
            return value in self.choices and isinstance(value, (str, type(None)))
        types = (int, float) if self.type is float else (self.type,)
        if not isinstance(value, types) or (isinstance(value, bool) and self.type is not bool):
            return False
        if self.type is bool:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value <= self.high


def check_options(cls, options, where):
    """Raise ValueError naming ``where.<key>`` and the allowed values for the first option ``cls`` refuses,
    or the first one that would be ignored because the switch it ``requires`` is off."""
    owner = f"block '{cls.block_name}'" if hasattr(cls, "block_name") else f"conv '{cls.conv_name}'"
    defaults = options_of(cls)
    for key, value in options.items():
        spec = cls.OPTIONS.get(key)
        if spec is not None and not spec.accepts(value):
            raise ValueError(f"{where}.{key}={value!r}: {owner} takes {spec.allowed()} for '{key}'; change it")
        if spec is not None and spec.requires and not options.get(spec.requires, defaults[spec.requires]):
            raise ValueError(f"{where}.{key}: {owner} uses '{key}' only with {spec.requires}: true, and "
                             f"{spec.requires} is false here, so it would be ignored; remove '{key}' or set "
                             f"{spec.requires}: true")


def _check_declared(cls, offered, kind):
    declared = set(getattr(cls, "OPTIONS", {}))
    if declared != set(offered):
        raise ValueError(f"{kind} {cls.__name__}: OPTIONS must declare exactly its constructor's options "
                         f"{sorted(offered)}; undeclared: {sorted(set(offered) - declared)}, "
                         f"not an option: {sorted(declared - set(offered))}")


_adjusted = set()


def log_adjustment(message):
    """Log ``message`` (an option a block adjusted, and the value it uses) once per process.

    Goes to the run's console through the ``blocklab`` logger (rank 0; engine.logger), as INFO. Until
    that logger shows INFO (e.g. the config check before the console is set up) nothing is recorded,
    so the model built for the run still says it."""
    log = logging.getLogger("blocklab.blocks")
    if message not in _adjusted and log.isEnabledFor(logging.INFO):
        _adjusted.add(message)
        log.info(message)


class Block(nn.Module):
    """The contract of a plug-in block: built as ``cls(channels, **options)``, its options declared in
    ``OPTIONS``. The class hooks below have neutral defaults; a block overrides those it needs. A block
    with a cheaper eval form also offers ``deploy()`` (``models.inference`` swaps it in)."""
    OPTIONS = {}

    @classmethod
    def stem_options(cls, **options):
        """The options to use when the block follows the stem norm (CE: one group there)."""
        return options

    @classmethod
    def min_side(cls, **options):
        """The smallest feature-map side these options work on (CE with pooling: 2)."""
        return 1

    @classmethod
    def branch_width(cls, width, stage, host="bottleneck", **options):
        """The host block's mid width with this block placed (ED -A/-B resize it; default unchanged)."""
        return width


def register_block(name, positions=("after_norm",), stem=False):
    """Register a block class under ``name``.

    positions: where it may attach ('after_norm': on the residual branch after
    its last norm; 'parallel': a path fed by the shortcut output, added into the sum).
    stem: whether it may also follow the stem norm.
    """
    bad = [p for p in positions if p not in POSITIONS]
    if bad:
        raise ValueError(f"unknown block position(s) {bad}; valid: {POSITIONS}")

    def deco(cls):
        if not issubclass(cls, Block):
            raise TypeError(f"block '{name}': {cls.__name__} must subclass blocks.registry.Block")
        if name in BLOCKS:
            raise ValueError(f"block '{name}' is registered twice")
        _check_declared(cls, options_of(cls, skip=1), "block")
        cls.block_name, cls.positions, cls.stem_ok = name, tuple(positions), stem
        BLOCKS[name] = cls
        return cls
    return deco


def register_conv(name):
    """Register a conv class built as ``cls(in, out, k, stride=, padding=, groups=, bias=, **options)``."""
    def deco(cls):
        if name in CONVS:
            raise ValueError(f"conv type '{name}' is registered twice")
        _check_declared(cls, set(options_of(cls, skip=3)) - CONV_CALL_ARGS, "conv")
        cls.conv_name = name
        CONVS[name] = cls
        return cls
    return deco


def get_block(name):
    if name in CONVS:
        raise KeyError(f"'{name}' is a conv type, not a plug-in block: remove it from model.plugins and "
                       f"set model.conv: {{type: {name}}}")
    if name not in BLOCKS:
        raise KeyError(f"unknown block type '{name}'{did_you_mean(name, BLOCKS)}; "
                       f"registered blocks: {sorted(BLOCKS)}")
    return BLOCKS[name]


def get_conv(name):
    if name in BLOCKS:
        raise KeyError(f"'{name}' is a plug-in block, not a conv type: set model.conv: {{type: plain}} and add "
                       f"{{type: {name}}} to model.plugins")
    if name not in CONVS:
        raise KeyError(f"unknown conv type '{name}'{did_you_mean(name, CONVS)}; "
                       f"registered convs: {sorted(CONVS)}")
    return CONVS[name]


def options_of(cls, skip=0):
    """The keyword options of ``cls.__init__`` with their defaults (the first ``skip`` positionals excluded)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1 + skip:]
    return {p.name: p.default for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
