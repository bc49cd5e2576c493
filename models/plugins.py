"""Plug-in specs: parse the config's ``model.plugins`` list and attach blocks to backbone places.

A spec is ``{type, position, stages, stem, **options}``. Backbones call
:func:`attach` at each place they offer (the residual branch after its last
norm, the parallel path from the shortcut, the stem norm); blocks chain in the
order the config lists them.
"""
from dataclasses import dataclass, field

from blocks.registry import get_block, options_of
import blocks  # noqa: F401  (registers the built-in blocks)

SPEC_KEYS = ("type", "position", "stages", "stem")
SPEC_DOCS = {  # the keys every model.plugins entry takes: (type, default, meaning), for docs/blocks.md
    "type": ("string", "required", "the block's registered name (ce, ed, se, ...); a conv type (we) goes in model.conv"),
    "position": ("string", "the block's first position", "where it attaches: after_norm (on the residual branch "
                 "after its last norm) or parallel (a path fed by the shortcut, added into the sum)"),
    "stages": ("list of int", "`null`", "1-based stage numbers it is placed in; null: every stage; an empty list "
               "only with stem: true"),
    "stem": ("bool", "`false`", "also place one after the stem norm (blocks that allow it)"),
}


@dataclass(frozen=True)
class PluginSpec:
    type: str
    position: str
    stages: tuple = None          # 1-based stage numbers; None = every stage
    stem: bool = False
    options: dict = field(default_factory=dict)

    @property
    def cls(self):
        return get_block(self.type)

    def applies(self, stage, position):
        return position == self.position and (self.stages is None or stage in self.stages)


def parse_plugins(plugins_cfg):
    """Turn the YAML plugin list into :class:`PluginSpec`; raises ValueError with one sentence."""
    specs = []
    for i, raw in enumerate(plugins_cfg or []):
        if not isinstance(raw, dict) or "type" not in raw:
            raise ValueError(f"model.plugins.{i} must be a mapping with a 'type' key, got {raw!r}")
        raw = dict(raw)
        cls = get_block(raw.pop("type"))
        position = raw.pop("position", cls.positions[0])
        stages = raw.pop("stages", None)
        stem = bool(raw.pop("stem", False))
        if stages is not None:
            stages = (stages,) if isinstance(stages, int) else tuple(stages)
        specs.append(PluginSpec(cls.block_name, position, stages, stem, raw))
    return specs


def block_options(spec):
    """The option names block ``spec.type`` accepts (its constructor's keyword arguments)."""
    return options_of(spec.cls, skip=1)


def unique_name(host, base):
    name, k = base, 1
    while hasattr(host, name):
        name, k = f"{base}_{k}", k + 1
    return name


def _add(host, spec, channels, options, name):
    module = spec.cls(channels, **options)
    module._blocklab_plugin = spec  # truthy; says which config entry made it
    name = unique_name(host, name)
    host.add_module(name, module)
    return name


def attach(host, specs, stage, channels, position, prefix=""):
    """Create the blocks of ``specs`` that apply at (stage, position) as submodules of ``host``.

    Returns their attribute names in config order (the host's forward applies them in turn).
    """
    return [_add(host, s, channels, s.options, prefix + s.type) for s in specs if s.applies(stage, position)]


def attach_stem(host, specs, channels):
    """Blocks with ``stem: true`` that follow the stem norm; named ``stem_<type>``.

    A block class may adapt its options to the stem with a ``stem_options(**options)``
    classmethod (CE uses one group of ``stem_group_channels`` there, as CENet does).
    """
    return [_add(host, s, channels, s.cls.stem_options(**s.options),
                 "stem_" + s.type) for s in specs if s.stem]


def branch_width(specs, width, stage, groups=1, host="bottleneck"):
    """Mid width of a host block ('bottleneck' or 'basic') after blocks that resize it (ED -A/-B) have their say."""
    for spec in specs:
        if spec.applies(stage, spec.position):
            new = spec.cls.branch_width(width, stage, host=host, **spec.options)
            if new != width:
                width = max(groups, int(round(new / groups)) * groups)  # grouped convs need multiples
    return width


def init_backbone(model, init_fn):
    """Apply ``init_fn`` to every module of ``model`` outside plug-in subtrees (blocks init themselves)."""
    def visit(module):
        if getattr(module, "_blocklab_plugin", False):
            return
        init_fn(module)
        for child in module.children():
            visit(child)
    visit(model)


__all__ = ["PluginSpec", "parse_plugins", "attach", "attach_stem", "branch_width", "init_backbone",
           "SPEC_KEYS", "block_options"]
