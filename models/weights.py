"""Load weights from our checkpoints, torchvision, and the original CE / ED / WE repositories.

``load_weights`` unwraps the usual containers (``state_dict``/``model`` entries,
``module.``/``_orig_mod.`` prefixes), lets a converter from
``models/converters`` rename a foreign repository's keys to ours, and compares
the result with the model key by key: missing, unexpected and wrong-shape keys
are reported exactly and refused unless the caller asked for a partial load.
"""
import fnmatch
import importlib
from dataclasses import dataclass, field

import torch

CONVERTERS = ("cenet", "ednet", "werepo")
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "ema_state_dict")
PREFIXES = ("module.", "_orig_mod.")
BENIGN_MISSING = ("num_batches_tracked",)


class WeightsMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model; the message lists exactly which keys."""


@dataclass
class LoadReport:
    source: str = "blocklab"
    loaded: int = 0
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)   # (key, checkpoint shape, model shape)
    ignored: list = field(default_factory=list)
    unused: list = field(default_factory=list)       # keys of modules a features-only model dropped (the head)

    @property
    def ok(self):
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit=5):
        def few(keys):
            keys = [k if isinstance(k, str) else f"{k[0]}: checkpoint {list(k[1])} vs model {list(k[2])}"
                    for k in keys]
            return ", ".join(keys[:limit]) + (f", ... (+{len(keys) - limit})" if len(keys) > limit else "")
        parts = [f"{len(v)} {n} ({few(v)})" for n, v in
                 (("missing", self.missing), ("unexpected", self.unexpected),
                  ("of the wrong shape", self.mismatched)) if v]
        if self.unused and not parts:
            return f"all {self.loaded} tensors matched; {len(self.unused)} unused by the features-only model " \
                   f"({few(self.unused)})"
        return "; ".join(parts) if parts else f"all {self.loaded} tensors matched"


def unwrap_state_dict(obj):
    """The flat name -> tensor mapping inside a checkpoint, with wrapper prefixes removed."""
    while isinstance(obj, dict) and not _is_flat(obj):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise WeightsMismatchError(
                f"no weights found in checkpoint: top-level keys {sorted(obj)[:8]}; expected a state dict "
                f"or one under {'/'.join(WRAPPER_KEYS)}")
        obj = inner
    if not isinstance(obj, dict):
        raise WeightsMismatchError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    out = {}
    for key, value in obj.items():
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


def _is_flat(d):
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def detect_source(state_dict):
    for name in CONVERTERS:
        if importlib.import_module(f"models.converters.{name}").detect(state_dict):
            return name
    return "blocklab"


def convert_state_dict(state_dict, model, source="auto"):
    """Rename a foreign checkpoint's keys to ours; returns (state_dict, source name)."""
    if source == "auto":
        source = detect_source(state_dict)
    if source in ("blocklab", "torchvision"):
        return state_dict, source
    if source not in CONVERTERS:
        raise WeightsMismatchError(f"unknown weights source '{source}'; valid: auto, blocklab, torchvision, "
                                   f"{', '.join(CONVERTERS)}")
    mod = importlib.import_module(f"models.converters.{source}")
    return mod.convert(state_dict, model), source


def load_weights(model, checkpoint, strict=True, source="auto", ignore=()):
    """Load ``checkpoint`` (a path or a loaded object) into ``model`` and return a :class:`LoadReport`.

    ``ignore``: glob patterns of model keys to leave as initialised (e.g. ``['fc.*']`` for a new
    classifier). With ``strict`` any other missing/unexpected/wrong-shape key raises
    :class:`WeightsMismatchError`; without it the matching tensors load and the report says what did not.
    """
    name = checkpoint if isinstance(checkpoint, str) else "<state dict>"
    if isinstance(checkpoint, str):
        from engine.checkpoint import load_checkpoint
        checkpoint = load_checkpoint(checkpoint)
    state_dict, src = convert_state_dict(unwrap_state_dict(checkpoint), model, source)
    own = model.state_dict()
    report = LoadReport(source=src)
    to_load = {}
    dropped = tuple(m + "." for m in getattr(model, "dropped_modules", ()))  # models.features.to_features
    for key, value in state_dict.items():
        if any(fnmatch.fnmatch(key, pat) for pat in ignore):
            report.ignored.append(key)
        elif key not in own and key.startswith(dropped):
            report.unused.append(key)
        elif key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            to_load[key] = value
    for key in own:
        if key in to_load or key in state_dict or any(fnmatch.fnmatch(key, p) for p in ignore):
            continue
        if not key.endswith(BENIGN_MISSING):
            report.missing.append(key)
    if strict and not report.ok:
        raise WeightsMismatchError(
            f"weights in {name} ({src} format) do not fit the model: {report.summary()}; if this is "
            f"intended (e.g. a new classifier) list the keys to skip in model.pretrained_ignore, e.g. ['fc.*']")
    model.load_state_dict(to_load, strict=False)
    report.loaded = len(to_load)
    return report
