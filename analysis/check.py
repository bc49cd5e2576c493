"""Try a combination before a cluster run (``python -m tools.check`` / ``tools.train --check``).

Loads the config (every key checked), builds its model, prints where the blocks
were placed (module names, with their options and the parameters they add),
the parameters and GFLOPs against the plain backbone (no plug-ins, plain convs),
then runs a few SGD steps (the config's optimizer settings) on synthetic images
of the config's input size, on CPU, and prints the losses. Nothing is written
and nothing is downloaded (``model.pretrained`` is not loaded).
"""

import torch

NAMES_SHOWN = 3


def placed_blocks(model, plain):
    """[(description, [module names], params added)] of what ``model`` has that the ``plain`` backbone has not:
    new modules (plug-ins) and modules of another class at the same name (conv types), in model order."""
    plain_modules = dict(plain.named_modules())
    groups, new = {}, []
    for name, m in model.named_modules():
        if any(name.startswith(f"{n}.") for n in new):
            continue  # inside a block already listed
        old = plain_modules.get(name)
        if old is not None and type(old) is type(m):
            continue
        new.append(name)
        added = sum(p.numel() for p in m.parameters()) - (sum(p.numel() for p in old.parameters()) if old else 0)
        what = f"{type(m).__name__}({m.extra_repr()})"
        names, params = groups.get(what, ([], 0))
        groups[what] = (names + [name], params + added)
    return [(what, names, params) for what, (names, params) in groups.items()]


def _names(names):
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f", ... ({len(names) - NAMES_SHOWN} more)" if len(names) > NAMES_SHOWN else "")


def _delta(value, base, scale, unit):
    pct = f", {100 * (value / base - 1):+.1f}%" if base else ""
    return f"{value / scale:.3f}{unit} ({(value - base) / scale:+.3f}{pct})"


def train_steps(cfg, model, steps, batch):
    """Losses of ``steps`` SGD steps on one batch of synthetic images of the config's input size (CPU, fp32).

    The same batch every step, at the config's learning rate scaled to this batch (linear rule), so
    the loss of a working combination goes down; the config's batch and peak LR on fresh random images
    would make a few steps look like divergence."""
    import torch.nn as nn

    from engine.optim import build_optimizer
    import data as data_lib
    syn = dict(cfg.data.to_dict(), dataset="synthetic", workers=0, pin_memory=False)  # the config's recipe
    syn["synthetic"] = dict(syn["synthetic"], train_size=batch, num_classes=None)
    dataset = data_lib.build_dataset(syn, "train", num_classes=cfg.model.num_classes)
    loader = data_lib.build_loader(dataset, syn, "train", batch)
    transform = data_lib.build_device_transform(syn, "train")
    optimizer = build_optimizer(model, dict(cfg.train, lr=cfg.train.lr * batch / cfg.train.batch_size))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    model.train()
    images, target = next(iter(loader))
    images = transform(images)
    losses = []
    for _ in range(steps):
        loss = criterion(model(images), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def check(config, overrides, steps=3, batch=2, out=print):
    """Run the check; returns the exit code. Raises core.fields.ConfigError for a refused config."""
    from analysis.flops import complexity
    from core.exits import EXIT_NONFINITE, EXIT_OK
    from engine.config import load_config
    from engine.summary import describe_blocks
    from engine.threads import set_threads
    from models import build_model
    cfg = load_config(config, overrides)
    set_threads(cfg.runtime.threads)
    size = cfg.data.input_size
    model_cfg = dict(cfg.model.to_dict(), pretrained=None)
    torch.manual_seed(cfg.runtime.seed)
    model = build_model(model_cfg)
    with torch.device("meta"):  # shapes are all the plain backbone's counts need
        plain = build_model(dict(model_cfg, plugins=[], conv={"type": "plain"}))
    out(f"{config}: {cfg.model.backbone}, {cfg.model.num_classes} classes, {size}x{size} input; blocks: "
        f"{describe_blocks(cfg.model)}" + ("; model.pretrained is not loaded by the check" if
                                           cfg.model.pretrained else ""))
    placed = placed_blocks(model, plain)
    if placed:
        out(f"placed {sum(len(n) for _, n, _ in placed)} modules:")
    for what, names, params in placed:
        out(f"  {len(names)} x {what}, {params:+,} params: {_names(names)}")
    params, gflops = complexity(model, size)
    base_params, base_gflops = complexity(plain, size)
    out(f"params {_delta(params, base_params, 1e6, ' M')}, GFLOPs {_delta(gflops, base_gflops, 1, '')}"
        f" vs the plain {cfg.model.backbone} at {size}x{size}")
    if cfg.model.features_only:
        out("ok: a features_only model (dense prediction): no classification steps; nothing written")
        return EXIT_OK
    losses = train_steps(cfg, model, steps, batch)
    where = f"{steps} steps on one batch of {batch} synthetic {size}x{size} images (CPU, fp32)"
    if not all(torch.isfinite(torch.tensor(losses))):
        out(f"error: loss not finite in {where}: {', '.join(f'{v:.4g}' for v in losses)}; check the block "
            f"options and train.lr")
        return EXIT_NONFINITE
    out(f"ok: {where}, loss {losses[0]:.4g} -> {losses[-1]:.4g}; nothing written")
    return EXIT_OK
