"""Datasets, transforms and loaders.

    dataset = build_dataset(cfg.data, 'train', num_classes=cfg.model.num_classes)
    loader = build_loader(dataset, cfg.data, 'train', per_rank_batch, distributed, seed)
    to_input = build_device_transform(cfg.data, 'train').to(device)
    for epoch in ...:
        start_epoch(loader, epoch)          # its shuffle; skip_batches= resumes mid-epoch
        for images, labels in loader:      # uint8 N x 3 x H x W, int64
            x = to_input(images.to(device, non_blocking=True))
"""
import importlib

# Imported on first use: the config check reads data.schema alone, without torchvision (seconds of startup).
_WHERE = {"build_dataset": "build", "build_device_transform": "build", "DataError": "errors",
          "ShardSampler": "loader", "TrainSampler": "loader", "build_loader": "loader", "start_epoch": "loader",
          "build_recipe": "recipe",
          "DATA_SCHEMA": "schema"}

__all__ = ["build_dataset", "build_loader", "build_device_transform", "build_recipe", "DataError", "DATA_SCHEMA",
           "TrainSampler", "ShardSampler", "start_epoch"]


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
