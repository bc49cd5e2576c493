"""What differs between tasks, as one small object the Trainer and ./test.sh are given (config ``task:``).

A task builds the datasets, the device transform and the model, computes the training loss of a batch
(and what its meter reads), evaluates, and words the console lines. Everything else (checkpoints, resume,
signals, lock, logging, AMP, distributed setup) is the engine's one code path.

- classification: cross-entropy on class scores, top-1/top-5 (engine/evaluator.py).
- detection: torchvision's Faster/Mask R-CNN over the backbone (models/detector.py), its loss dict summed,
  pycocotools COCOeval (engine/coco_eval.py) on a COCO-format set (data/coco.py).
"""
import torch
import torch.nn as nn

from engine.meters import SumMeter


class ClassificationTask:
    best_keys = ("top1", "top5")  # best.json keeps the best of each over the evaluations (record_best_of)

    def __init__(self, cfg):
        from models.features import require_classifier
        require_classifier(cfg.model, "classification (top-1/top-5 training and evaluation)")
        self.cfg = cfg
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)

    def build_dataset(self, split):
        import data
        return data.build_dataset(self.cfg.data, split, num_classes=self.cfg.model.num_classes)

    def device_transform(self, split):
        import data
        cfg = self.cfg
        return data.build_device_transform({**cfg.data, "channels_last": cfg.data.channels_last or
                                            cfg.train.channels_last}, split)

    def build_model(self, model_cfg):
        from models import build_model
        return build_model(model_cfg)

    def weights_target(self, model):
        """The module ``model.pretrained`` weights load into."""
        return model

    def loss(self, net, images, target):
        """(loss, what the meter reads besides it)."""
        logits = net(images)
        return self.criterion(logits, target), logits

    def meter(self, device):
        return SumMeter(device)

    def evaluate(self, model, loader, device, transform, amp, results_path=None, on_batch=None):
        from engine.evaluator import evaluate
        return evaluate(model, loader, device, transform, amp, on_batch=on_batch)

    @staticmethod
    def train_line(m):
        return f"loss {m['loss']:.4f} top1 {m['top1']:.2f} top5 {m['top5']:.2f}"

    @staticmethod
    def val_line(m):
        return f"top1 {m['top1']:.2f} top5 {m['top5']:.2f} loss {m['loss']:.4f}"


class ToFloat(nn.Module):
    """uint8 images (a list, each its own size) to [0, 1] floats; the detector normalises and resizes."""

    def forward(self, images):
        return [x.float().div_(255) for x in images]


class LossDictMeter:
    """Running sums of the total loss and each named component (one entry per step), on the device."""

    def __init__(self, device, names):
        self.names = names
        self.sums = torch.zeros(len(names) + 2, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, loss, losses, target):
        parts = [loss.detach().double().view(1)] + [losses[k].detach().double().view(1) for k in self.names]
        self.sums += torch.cat(parts + [self.sums.new_ones(1)])

    def reset(self):
        self.sums.zero_()

    def read(self):
        values = self.sums.tolist()
        n = max(values[-1], 1.0)
        return dict(zip(("loss",) + self.names, (v / n for v in values[:-1])))


LOSSES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


class DetectionTask:
    def __init__(self, cfg):
        from data.recipe import build_recipe
        self.cfg, self.recipe = cfg, build_recipe(cfg.data)
        self.masks = cfg.detector.type == "mask_rcnn"
        self.iou_types = ("bbox", "segm") if self.masks else ("bbox",)
        self.losses = LOSSES + (("loss_mask",) if self.masks else ())
        self.best_keys = tuple(f"{t}_{k}" for t in self.iou_types for k in ("AP", "AP50", "AP75"))

    def build_dataset(self, split):
        import data
        return data.build_dataset(self.cfg.data, split, num_classes=self.cfg.detector.num_classes,
                                  masks=self.masks)

    def device_transform(self, split):
        return ToFloat()

    def build_model(self, model_cfg):
        from models.detector import build_detector
        return build_detector(model_cfg, self.cfg.detector, self.recipe.mean, self.recipe.std)

    def weights_target(self, model):
        from models.detector import detector_body
        return detector_body(model)

    def loss(self, net, images, targets):
        losses = net(images, list(targets))
        return sum(losses.values()), losses

    def meter(self, device):
        return LossDictMeter(device, self.losses)

    def evaluate(self, model, loader, device, transform, amp, results_path=None, on_batch=None):
        from engine.coco_eval import evaluate_coco
        return evaluate_coco(model, loader, device, transform, amp, self.iou_types, results_path, on_batch)

    def train_line(self, m):
        parts = " ".join(f"{k[5:]} {m[k]:.3f}" for k in self.losses)
        return f"loss {m['loss']:.4f} ({parts})"

    def val_line(self, m):
        return " | ".join(f"{t} AP {m[f'{t}_AP']:.3f} AP50 {m[f'{t}_AP50']:.3f} AP75 {m[f'{t}_AP75']:.3f}"
                          for t in self.iou_types)


def build_task(cfg):
    """The task object of a config (``task:``, default classification)."""
    return {"classification": ClassificationTask, "detection": DetectionTask}[cfg.get("task", "classification")](cfg)
