"""YAML configs: safe loading, ``_base_`` inheritance, overrides, strict schema.

A config file is YAML read with a safe loader (no Python objects; ``1e-4`` is a
float; a key given twice is an error). ``_base_: [a.yaml, b.yaml]`` names files,
relative to the file, that are deep-merged in order before the file itself
(dicts merge key by key, lists and scalars are replaced; ``_delete_: true`` in a
dict replaces the inherited dict instead of merging). Command-line overrides
``key.sub=value`` take YAML-typed values; list items are addressed by index
(``model.plugins.0.stages=[1,2]``). The merged tree is checked against a schema
(a nested dict of :class:`core.fields.Field`; the run's is assembled in
``engine/config.py``): unknown keys, wrong types and bad choices are refused with
the key's path and the nearest valid key; missing keys take their defaults. The
result is a :class:`Config`, a dict with attribute access. Torch-free.
"""
import copy
import os
import re
from collections.abc import Mapping

import yaml

from core.fields import ConfigError, Field
from core.names import did_you_mean

BASE_KEY = "_base_"
DELETE_KEY = "_delete_"


# ----------------------------------------------------------------------------- YAML

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float and refuses duplicate keys."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


_NO_SPACE = re.compile(r"^[A-Za-z_][\w.]*:[^\s/]")  # 'type:ce' (a URL 'http://...' is not one)


def _colon_hint(text):
    """' (write 'type: ce'...)' when ``text`` reads as a key and value typed without the space YAML needs."""
    if isinstance(text, str) and _NO_SPACE.match(text):
        key, value = text.split(":", 1)
        return f"; '{text}' reads as one word: write '{key}: {value}' (YAML needs a space after the colon)"
    return ""


def _construct_mapping(loader, node, deep=False):
    keys = set()
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if value_node.tag.endswith(":null") and value_node.value == "" and _colon_hint(key):
            raise ConfigError(f"key '{key}' (line {key_node.start_mark.line + 1}) has no value"
                              f"{_colon_hint(key)}")
        if key in keys:
            raise ConfigError(f"key '{key}' is given twice (line {key_node.start_mark.line + 1}); "
                              f"keep one of them")
        keys.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# A config is a few hundred values a few levels deep: these bounds refuse alias bombs ("billion laughs"),
# deeply nested brackets and huge numbers in milliseconds, before anything expands them.
MAX_DEPTH = 32
MAX_VALUES = 100_000  # after alias expansion
MAX_INT_DIGITS = 18   # every integer key fits in int64


def _construct_int(loader, node):
    digits = re.sub(r"[^0-9a-fA-F]", "", str(node.value))
    if len(digits) > MAX_INT_DIGITS:
        raise ConfigError(f"line {node.start_mark.line + 1}: integer {str(node.value)[:12]}... has {len(digits)} "
                          f"digits (at most {MAX_INT_DIGITS}); no key takes such a number")
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _check_flow_depth(text):
    """Refuse deep ``[[[...``/``{a: {a: ...`` before PyYAML's scanner, whose look-ahead is quadratic in them."""
    depth, quote, line = 0, None, 1
    for i, ch in enumerate(text):
        if ch == "\n":
            line += 1
        if quote:
            quote = None if ch == quote and text[i - 1] != "\\" else quote
        elif ch in "\"'" and (i == 0 or text[i - 1] in " \t\n[{,:"):
            quote = ch
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(f"line {line}: nested more than {MAX_DEPTH} levels deep; "
                                  "a config is a few levels of sections and lists")
        elif ch in "]}":
            depth = max(depth - 1, 0)


def _check_depth(text):
    _check_flow_depth(text)
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(f"line {event.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep; "
                                  "a config is a few levels of sections and lists")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _expanded_size(node, memo):
    """How many values ``node`` stands for once its aliases are expanded (aliases share node objects)."""
    if id(node) not in memo:
        memo[id(node)] = 0  # an alias to an enclosing node (a cycle) counts once
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else ()
        memo[id(node)] = min(1 + sum(_expanded_size(c, memo) for c in children), MAX_VALUES + 1)
    return memo[id(node)]


def _load_bounded(text):
    _check_depth(text)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_VALUES:
            raise ConfigError(f"its aliases (*name) expand to more than {MAX_VALUES} values; "
                              "a config has a few hundred: write the values out or use _base_ files")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_yaml(text, where="<string>"):
    """Parse YAML text with the project's safe loader, refusing inputs no config needs (see MAX_DEPTH...)."""
    try:
        return _load_bounded(text)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}:{line}: invalid YAML ({problem}); fix the syntax "
                          f"(only plain YAML values are allowed)") from None


# ----------------------------------------------------------------------------- Config

class Config(dict):
    """A nested dict with attribute access (``cfg.train.lr``); dicts inside lists convert too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for k, v in self.items():
            dict.__setitem__(self, k, _wrap(v))

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key '{name}'{did_you_mean(name, self)}") from None

    def __setattr__(self, name, value):
        self[name] = value

    def __setitem__(self, key, value):
        dict.__setitem__(self, key, _wrap(value))

    def __deepcopy__(self, memo):
        return Config(copy.deepcopy(dict(self), memo))

    def to_dict(self):
        """Plain dicts and lists all the way down (what checkpoints and YAML dumps store)."""
        return _unwrap(self)


def _wrap(v):
    if isinstance(v, Mapping) and not isinstance(v, Config):
        return Config(v)
    if isinstance(v, list):
        return [_wrap(x) for x in v]
    return v


def _unwrap(v):
    if isinstance(v, Mapping):
        return {k: _unwrap(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_unwrap(x) for x in v]
    return v


# ----------------------------------------------------------------------------- merge

def merge(base, update):
    """Deep-merge ``update`` into a copy of ``base``: dicts by key, everything else replaced."""
    if not isinstance(base, Mapping) or not isinstance(update, Mapping):
        return copy.deepcopy(update)
    update = dict(update)
    if update.pop(DELETE_KEY, False):
        return copy.deepcopy(update)
    out = copy.deepcopy(dict(base))
    for k, v in update.items():
        out[k] = merge(out[k], v) if k in out else _strip_delete(copy.deepcopy(v))
    return out


def _strip_delete(v):
    if isinstance(v, dict):
        return {k: _strip_delete(x) for k, x in v.items() if k != DELETE_KEY}
    return v


def read_tree(path, _stack=()):
    """Read one YAML file with its ``_base_`` files merged in (no schema applied)."""
    path = os.path.abspath(path)
    if path in _stack:
        chain = " -> ".join(os.path.basename(p) for p in _stack + (path,))
        raise ConfigError(f"{path}: _base_ files include each other ({chain}); remove the cycle")
    if not os.path.isfile(path):
        where = f" (named in {_stack[-1]})" if _stack else ""
        raise ConfigError(f"config file {path} not found{where}; check the path")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}; check its permissions") from None
    tree = parse_yaml(text, path)
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got "
                          f"{type(tree).__name__}" + (_colon_hint(tree) or "; write 'section: {key: value}'"))
    bases = tree.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a list of file paths, got {bases!r}; "
                          f"write '_base_: [../_base_/runtime.yaml]'")
    merged = {}
    for b in bases:
        merged = merge(merged, read_tree(os.path.join(os.path.dirname(path), b), _stack + (path,)))
    return merge(merged, tree)


# ----------------------------------------------------------------------------- overrides

def parse_override(text):
    """``'a.b.0=[1, 2]'`` -> (['a', 'b', '0'], [1, 2])."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' is not of the form key.sub=value; "
                          f"write e.g. train.lr=0.1 or model.plugins.0.stages=[1,2]")
    val = parse_yaml(value, f"override '{text}'") if value.strip() else ""
    return key.split("."), val


def apply_override(tree, parts, value, text):
    """Set ``tree[parts...] = value``; list items by index, missing dict keys created."""
    node = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[:depth + 1])
        if isinstance(node, list):
            if not re.fullmatch(r"-?\d+", part):
                raise ConfigError(f"override '{text}': {'.'.join(parts[:depth]) or 'value'} is a list, "
                                  f"'{part}' is not an index; use a number, e.g. {here.rsplit('.', 1)[0]}.0")
            i = int(part)
            if not -len(node) <= i < len(node):
                raise ConfigError(f"override '{text}': index {i} is out of range for "
                                  f"{'.'.join(parts[:depth])} ({len(node)} items); "
                                  f"set the whole list instead, e.g. {'.'.join(parts[:depth])}=[...]")
            if last:
                node[i] = value
            else:
                node = node[i]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"override '{text}': {'.'.join(parts[:depth])} is a "
                              f"{type(node).__name__}, not a mapping or list; override it as a whole")
    return tree


# ----------------------------------------------------------------------------- schema

def fill_defaults(tree, schema):
    """Add schema defaults for missing keys (unknown keys are left for :func:`validate`)."""
    out = dict(tree) if isinstance(tree, Mapping) else {}
    for k, spec in schema.items():
        if isinstance(spec, Field):
            if k not in out:
                out[k] = copy.deepcopy(spec.default)
        elif isinstance(out.get(k, {}), Mapping):
            out[k] = fill_defaults(out.get(k, {}), spec)
    return out


def validate(tree, schema, prefix=""):
    """Return ``tree`` with defaults filled, refusing unknown keys and bad values."""
    if not isinstance(tree, Mapping):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where} must be a mapping of keys, got {tree!r}" + (_colon_hint(tree) or
                          f"; write '{where.rsplit('.', 1)[-1]}: {{key: value}}' (keys: {', '.join(map(str, schema))})"))
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if k not in schema:
            hint = did_you_mean(k, schema, prefix)
            raise ConfigError(f"unknown key '{path}'{hint}" + ("; fix or remove it" if hint else
                              f"; valid keys{' in ' + prefix[:-1] if prefix else ''}: {', '.join(map(str, schema))}"))
        spec = schema[k]
        if isinstance(spec, Field):
            if isinstance(v, tuple) and list in spec.types():  # a Mapping from code may hold tuples
                v = list(v)
            spec.check_value(v, path)
            out[k] = v
        else:
            out[k] = validate(v, spec, path + ".")
    for k, spec in schema.items():
        if k not in out:
            out[k] = copy.deepcopy(spec.default) if isinstance(spec, Field) \
                else validate({}, spec, f"{prefix}{k}.")
    return {k: out[k] for k in schema}  # schema order, so dumps read like the reference


# ----------------------------------------------------------------------------- entry points

def build(tree, schema, overrides=(), checks=(), where="config"):
    """Validate an already-merged tree (plus overrides) against ``schema`` into a :class:`Config`.

    ``checks`` are called with the validated tree, in order, for rules across keys.
    """
    tree = fill_defaults(copy.deepcopy(dict(tree)), schema)
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(tree, parts, value, text)
    try:
        tree = validate(tree, schema)
        for check in checks:
            check(tree)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return Config(tree)


def load(path, schema, overrides=(), checks=()):
    """Read ``path`` (with ``_base_`` files), apply ``overrides`` and check it against ``schema``."""
    return build(read_tree(path), schema, overrides, checks, where=os.path.relpath(path))


def dump(cfg, path=None):
    """The config as YAML text (written to ``path`` when given); loads back to the same config."""
    text = yaml.safe_dump(_unwrap(cfg), sort_keys=False, default_flow_style=None, width=100)
    if path is not None:
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):  # a failed write leaves nothing behind
                os.remove(tmp)
    return text
