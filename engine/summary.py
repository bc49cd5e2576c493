"""The few console lines that describe a run at its start (the full resolved config is ``<work_dir>/config.yaml``)."""
import os


def describe_blocks(model_cfg):
    """'ce after_norm in stages [1, 2, 3] (group_channels=16)' per plug-in, and the conv type when it is not plain."""
    from models.plugins import parse_plugins
    parts = []
    for spec in parse_plugins(model_cfg.get("plugins")):
        where = f" in stages {list(spec.stages)}" if spec.stages else " in every stage"
        options = ", ".join(f"{k}={v}" for k, v in spec.options.items())
        parts.append(f"{spec.type} {spec.position}{where}{' and the stem' * spec.stem}"
                     + (f" ({options})" if options else ""))
    conv = dict(model_cfg.get("conv") or {"type": "plain"})
    if conv.get("type", "plain") != "plain":
        kind = conv.pop("type")
        parts.append(f"conv {kind}" + (f" ({', '.join(f'{k}={v}' for k, v in conv.items())})" if conv else ""))
    return "; ".join(parts) or "none (the plain backbone)"


def run_summary(t, threads_line):
    """Lines for the Trainer ``t`` once it is set up: model, blocks, data, schedule, processes, work dir."""
    cfg, tr = t.cfg, t.cfg.train
    warmup = f", warmup {tr.warmup_epochs:g} epoch{'s' * (tr.warmup_epochs != 1)}" if tr.warmup_epochs else ""
    amp = f", amp {tr.amp}" if tr.amp != "none" else ""
    return [
        f"model: {cfg.model.backbone}, {cfg.model.num_classes} classes; blocks: {describe_blocks(cfg.model)}",
        f"data: {cfg.data.dataset} {cfg.data.input_size}x{cfg.data.input_size}, {len(t.train_set)} train / "
        f"{len(t.val_set)} val images, {cfg.data.workers} loader workers per process",
        f"schedule: {tr.epochs} epochs x {t.iters_per_epoch} steps, batch {tr.batch_size} ({t.batch} per process x "
        f"{t.accum} accumulation), {tr.optimizer} lr {tr.lr:g} {tr.schedule}{warmup}{amp}",
        f"world size {t.dist.world_size} ({t.dist.backend or 'single process'}) on {t.device}; {threads_line}",
        f"work dir: {t.work_dir} (full config: {os.path.join(t.work_dir, 'config.yaml')})",
    ]
