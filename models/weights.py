"""Load weights from our checkpoints, torchvision, and the original CE / ED / WE repositories.

``load_weights`` unwraps the usual containers (``state_dict``/``model`` entries,
``module.``/``_orig_mod.`` prefixes), lets a converter from
``models/converters`` rename a foreign repository's keys to ours, and compares
the result with the model key by key: missing, unexpected and wrong-shape keys
are reported exactly and refused unless the caller asked for a partial load.
Fine-tuning (``new_head=True``) leaves the classifier (the keys under the
backbone's ``head_prefix``) at its fresh initialisation when the checkpoint's
differs in shape (another class count) or is absent; every other key stays strict.
"""
import fnmatch
import importlib
from dataclasses import dataclass, field

import torch

from core.fields import ConfigError

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
    reinitialised: list = field(default_factory=list)  # (key, checkpoint shape or None, model shape)
    unused: list = field(default_factory=list)       # keys of modules a features-only model dropped (the head)

    @property
    def ok(self):
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def skipped(self):
        """Every key not loaded on purpose: the re-initialised head, then those pretrained_ignore matched."""
        return [k for k, _, _ in self.reinitialised] + list(self.ignored)

    def summary(self, limit=5):
        def few(keys):
            keys = [k if isinstance(k, str) else f"{k[0]}: checkpoint {list(k[1])} vs model {list(k[2])}"
                    for k in keys]
            return ", ".join(keys[:limit]) + (f", ... (+{len(keys) - limit})" if len(keys) > limit else "")
        parts = [f"{len(v)} {n} ({few(v)})" for n, v in
                 (("missing", self.missing), ("unexpected", self.unexpected),
                  ("of the wrong shape", self.mismatched)) if v]
        if parts:
            return "; ".join(parts)
        unused = (f"; {len(self.unused)} unused by the features-only model ({few(self.unused)})"
                  if self.unused else "")
        if not self.skipped:
            return f"all {self.loaded} tensors matched" + unused
        return (f"{self.loaded} tensors loaded; skipped {len(self.skipped)}: " + "; ".join(self.skipped_reasons())
                + unused)

    def skipped_reasons(self):
        """One entry per skipped key, each saying why (all of them: the report must be exact)."""
        out = []
        for key, ckpt, own in self.reinitialised:
            was = f"checkpoint {list(ckpt)}" if ckpt is not None else "not in the checkpoint"
            out.append(f"{key} (classifier re-initialised: {was}, model {list(own)})")
        return out + [f"{key} (model.pretrained_ignore)" for key in self.ignored]


def checkpoint_weights(checkpoint, ema=False, name="the checkpoint"):
    """What to load from a loaded checkpoint: the checkpoint itself (:func:`load_weights` unwraps it) or,
    with ``ema``, the EMA model's weights a training checkpoint keeps beside the model's."""
    if not ema:
        return checkpoint
    kept = checkpoint.get("ema") if isinstance(checkpoint, dict) else None
    if isinstance(kept, dict) and isinstance(kept.get("module"), dict):
        return kept["module"]
    raise ConfigError(f"{name} holds no EMA weights (train.ema was off); drop --ema")


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


def _new_head_keys(model, state_dict, own):
    """Model keys of the classifier when the checkpoint's does not fit it (another class count, or absent)."""
    prefix = getattr(model, "head_prefix", None)
    keys = [k for k in own if prefix and k.startswith(prefix)]
    if any(k not in state_dict or tuple(state_dict[k].shape) != tuple(own[k].shape) for k in keys):
        return keys
    return []


def _trained_as(checkpoint):
    """' (trained as resnet50 with ce)' when the checkpoint carries our config, else ''."""
    cfg = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict) or not model.get("backbone"):
        return ""
    plugins = [p.get("type", "?") for p in model.get("plugins") or [] if isinstance(p, dict)]
    return f" (it was trained as {model['backbone']} with {', '.join(plugins) or 'no plug-ins'})"


def load_weights(model, checkpoint, strict=True, source="auto", ignore=(), new_head=False, name=None, fix=None):
    """Load ``checkpoint`` (a loaded checkpoint or state dict; files are read by ``engine.checkpoint``) into ``model`` and return a :class:`LoadReport`.

    ``ignore``: glob patterns of model keys to leave as initialised (e.g. ``['fc.*']`` for a new
    classifier). ``new_head``: leave the classifier as initialised when the checkpoint's does not fit
    (fine-tuning to another class count). With ``strict`` any other missing/unexpected/wrong-shape key
    raises :class:`WeightsMismatchError`; without it the matching tensors load and the report says what did not.
    ``name``: the file a loaded ``checkpoint`` came from; ``fix``: the error's advice (default: fine-tuning's).
    """
    name = name or "<state dict>"
    state_dict, src = convert_state_dict(unwrap_state_dict(checkpoint), model, source)
    own = model.state_dict()
    report = LoadReport(source=src)
    head = _new_head_keys(model, state_dict, own) if new_head else []
    for key in head:
        report.reinitialised.append((key, tuple(state_dict[key].shape) if key in state_dict else None,
                                     tuple(own[key].shape)))
    to_load = {}
    dropped = tuple(m + "." for m in getattr(model, "dropped_modules", ()))  # models.features.to_features
    for key, value in state_dict.items():
        if key in head:
            continue
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
        if key in to_load or key in state_dict or key in head or any(fnmatch.fnmatch(key, p) for p in ignore):
            continue
        if not key.endswith(BENIGN_MISSING):
            report.missing.append(key)
    if strict and not report.ok:
        hint = fix or ("build the checkpoint's architecture (model.backbone, backbone_args, conv, plugins; only the "
                "classifier may differ), or list the keys not to load in model.pretrained_ignore"
                if new_head else "if this is intended (e.g. a new classifier) list the keys to skip in "
                "model.pretrained_ignore, e.g. ['fc.*']")
        raise WeightsMismatchError(f"weights in {name} ({src} format) do not fit the model{_trained_as(checkpoint)}: "
                                   f"{report.summary()}; {hint}")
    model.load_state_dict(to_load, strict=False)
    report.loaded = len(to_load)
    return report
