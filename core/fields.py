"""Schema building blocks shared by every config section.

A schema is a nested dict whose leaves are :class:`Field`. Each section of the
config (model, data, train, ...) owns its schema next to the code that reads it
(``models/schema.py``, ``data/schema.py``, ``engine/schema.py``); the loader in
``engine/config.py`` checks a merged YAML tree against the union of them.
"""
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

from core.names import did_you_mean


class ConfigError(ValueError):
    """A config, override or argument that cannot be used; the message is one line naming the fix."""


@dataclass(frozen=True)
class Field:
    """One config key: its default, a one-line doc, and what values it accepts.

    ``type`` defaults to the type of ``default`` (int is accepted where float is
    expected; None is accepted when ``nullable``). ``check`` is called with
    ``(value, path)`` and raises :class:`ConfigError` for values the type alone
    cannot rule out (e.g. a plugin list).
    """
    default: Any
    doc: str
    type: Optional[Tuple[type, ...]] = None
    choices: Optional[Tuple[Any, ...]] = None
    nullable: bool = False
    check: Optional[Callable[[Any, str], None]] = None

    def types(self):
        if self.type is not None:
            return self.type if isinstance(self.type, tuple) else (self.type,)
        if self.default is None:
            return (object,)
        t = type(self.default)
        return (int, float) if t is float else (t,)

    def check_value(self, value, path):
        """Refuse ``value`` at ``path`` unless it has this field's type, choices and check."""
        if value is None:
            if self.nullable or self.default is None:
                return
            raise ConfigError(f"{path} must not be null; set it to {_type_name(self.types())} "
                              f"(default: {self.default!r})")
        types = self.types()
        ok = any(isinstance(value, t) and not (isinstance(value, bool) and t in (int, float))
                 for t in types)
        if not ok:
            raise ConfigError(f"{path} must be {_type_name(types)}, got {value!r} "
                              f"({type(value).__name__}); e.g. {path}={self.default!r}")
        refuse_non_finite(value, path)
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{path}={value!r} is not one of {list(self.choices)}"
                              f"{did_you_mean(value, self.choices)}")
        if self.check is not None:
            self.check(value, path)


def non_finite(value):
    """True for a float nan/inf or a list holding one: no config key means them (null is 'off')."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(non_finite(v) for v in value)
    return False


def refuse_non_finite(value, path):
    if non_finite(value):
        raise ConfigError(f"{path}={value!r} is not a finite number; give a real value (or null where allowed)")


def _type_name(types):
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a mapping"}
    if set(types) == {int, float}:
        return "a number"
    return " or ".join(names.get(t, t.__name__) for t in types)


# ----------------------------------------------------------------------------- value checks shared by the schemas

def at_least(low, strict=False):
    """A ``Field.check``: the value must be >= ``low`` (> with ``strict``)."""
    def check(value, path):
        if value < low or (strict and value == low):
            raise ConfigError(f"{path}={value!r} must be {'>' if strict else '>='} {low}; change it")
    return check


def in_range(low, high):
    """A ``Field.check``: the value must lie in [low, high]."""
    def check(value, path):
        if not low <= value <= high:
            raise ConfigError(f"{path}={value!r} must be in [{low:,}, {high:,}]; change it")
    return check


def list_of(kind, low=None, name="item"):
    """A ``Field.check`` for a list: each item of type ``kind`` (and >= ``low``)."""
    def check(value, path):
        for i, x in enumerate(value):
            if not isinstance(x, kind) or isinstance(x, bool) or (low is not None and x < low):
                bound = f" >= {low}" if low is not None else ""
                raise ConfigError(f"{path}.{i}={x!r}: each {name} must be {kind.__name__}{bound}; "
                                  f"e.g. {path}=[30, 60, 90]")
    return check

