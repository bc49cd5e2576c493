"""Datasets, transforms and loaders.

    dataset = build_dataset(cfg.data, 'train', num_classes=cfg.model.num_classes)
    loader = build_loader(dataset, cfg.data, 'train', per_rank_batch, distributed, seed)
    to_input = build_device_transform(cfg.data, 'train').to(device)
    for epoch in ...:
        loader.sampler.set_epoch(epoch)
        for images, labels in loader:      # uint8 N x 3 x H x W, int64
            x = to_input(images.to(device, non_blocking=True))
"""
from .build import build_dataset, build_device_transform
from .errors import DataError
from .loader import ShardSampler, TrainSampler, build_loader
from .recipe import build_recipe
from .schema import DATA_SCHEMA

__all__ = ["build_dataset", "build_loader", "build_device_transform", "build_recipe", "DataError", "DATA_SCHEMA",
           "TrainSampler", "ShardSampler"]
