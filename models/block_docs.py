"""The generated part of docs/blocks.md: every block's and conv type's options, and block x backbone.

    python -m models.block_docs     # prints it; paste below the marker in docs/blocks.md

Read from the registries (``blocks.registry``: ``OPTIONS`` and the constructors' defaults) and the
backbones (``models.BACKBONES``), so a new block, option or backbone appears here and a test
(tests/test_docs.py) notices when the page is stale. The compatibility cells come from validating
``{type: <block>}`` with its defaults on each backbone (a build on the meta device).
"""
import inspect

from blocks.conv import EXCLUDE, conv_option_names
from blocks.registry import BLOCKS, CONVS, options_of
from core.fields import ConfigError

from . import BACKBONES, validate_model_cfg
from .plugins import SPEC_DOCS

TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "string", list: "list"}


def _value(v):
    """A default as it is written in YAML."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return repr(v) if isinstance(v, str) else str(v)


def _cell(text):
    return str(text).replace("|", "\\|")


def _first_line(cls):
    return (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")


def _options_table(cls, defaults):
    rows = ["| option | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for name, spec in cls.OPTIONS.items():
        kind = TYPE_NAMES[spec.type] + (" or null" if spec.nullable else "")
        needs = f" (only with `{spec.requires}: true`)" if spec.requires else ""
        rows.append(f"| `{name}` | {kind} | `{_value(defaults[name])}` | {_cell(spec.allowed())} | "
                    f"{_cell(spec.doc)}{needs} |")
    return rows if cls.OPTIONS else ["No options."]


def option_sections():
    """Markdown: the plug-in entry keys, then one section per block and per conv type."""
    out = ["## Keys of every `model.plugins` entry", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    out += [f"| `{k}` | {t} | {d} | {_cell(doc)} |" for k, (t, d, doc) in SPEC_DOCS.items()]
    for name in sorted(BLOCKS):
        cls = BLOCKS[name]
        out += ["", f"## Block `{name}`", "", _first_line(cls), "",
                f"Positions: {', '.join(cls.positions)}; after the stem norm (`stem: true`): "
                f"{'yes' if cls.stem_ok else 'no'}.", ""]
        out += _options_table(cls, options_of(cls, skip=1))
    out += ["", "## Keys of `model.conv`", "", "| key | type | default | meaning |", "|---|---|---|---|",
            f"| `type` | string | `'plain'` | conv type: {', '.join(sorted(CONVS))} |",
            f"| `exclude` | list | `[]` | {_cell(EXCLUDE.allowed())}: {_cell(EXCLUDE.doc)} |"]
    for name in sorted(CONVS):
        cls = CONVS[name]
        defaults = options_of(cls, skip=3)
        out += ["", f"## Conv type `{name}`", "", _first_line(cls), ""]
        out += _options_table(cls, {k: defaults[k] for k in conv_option_names(name)})
    return out


def _refusal(backbone, blocks):
    """The error validating ``blocks`` (defaults) on ``backbone`` gives, or None."""
    try:
        validate_model_cfg({"backbone": backbone, "num_classes": 10, "plugins": [{"type": b} for b in blocks]})
    except ConfigError as e:
        return str(e)
    return None


def compatibility(backbone, blocks):
    """The table row's cells: can ``{type: block}`` (its defaults) go on ``backbone``, and on its stem."""
    host = BACKBONES[backbone][1]
    placeable = [b for b in blocks if set(BLOCKS[b].positions) & set(host.places)]
    together_ok = _refusal(backbone, placeable) is None  # one build for the usual case: all of them work
    cells = []
    for b in blocks:
        cls = BLOCKS[b]
        refusal = None if together_ok else _refusal(backbone, [b])
        if b not in placeable:
            cells.append(f"no ({' or '.join(cls.positions)} place not offered)")
        elif refusal:
            cells.append(f"no: {_cell(refusal)}")
        else:
            cells.append("yes, stem too" if cls.stem_ok and "stem" in host.places else "yes")
    return cells


def compatibility_table():
    blocks = sorted(BLOCKS)
    out = ["## Which block works on which backbone", "",
           "Each block with its default options (`{type: <block>}`), validated by building the model. "
           "Conv types replace every conv the backbone makes, so "
           f"{', '.join(f'`{c}`' for c in sorted(CONVS))} work on every backbone.", "",
           "| backbone | " + " | ".join(f"`{b}`" for b in blocks) + " |", "|---" * (len(blocks) + 1) + "|"]
    out += [f"| `{bb}` | " + " | ".join(compatibility(bb, blocks)) + " |" for bb in sorted(BACKBONES)]
    return out


def main():
    print("\n".join(option_sections() + [""] + compatibility_table()))


if __name__ == "__main__":
    main()
