"""torchvision's Faster R-CNN / Mask R-CNN with an FPN over a blocklab backbone (config ``task: detection``).

The body is ``build_model(cfg.model, features_only=True, out_indices=detector.out_indices)``, so every block,
``frozen_stages`` and ``norm_eval`` apply as in classification; :class:`models.features.FPNBackbone` adds
the FPN (plus the max-pooled level). Heads, losses, box coding, NMS and the resize/normalise transform are
torchvision's own. ``pretrained`` weights (classification checkpoints) load into ``detector.backbone.body``.
"""
from core.fields import ConfigError

from . import build_model
from .features import FPNBackbone


def check_detector(det):
    """Refuse a detector section whose parts do not fit together (one line)."""
    levels = len(det["out_indices"]) + 1
    if len(det["anchor_sizes"]) != levels:
        raise ConfigError(f"detector.anchor_sizes has {len(det['anchor_sizes'])} sizes but the FPN has {levels} "
                          f"levels (out_indices {det['out_indices']} + the pooled level); give one size per level")
    if det["min_size"] > det["max_size"]:
        raise ConfigError(f"detector.min_size={det['min_size']} exceeds detector.max_size={det['max_size']}; "
                          f"raise max_size")


def build_detector(model_cfg, det, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """The detector of a ``detector:`` section over the backbone of ``model_cfg``; ``mean``/``std`` normalise
    its [0, 1] float inputs (the data recipe's)."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign
    check_detector(det)
    body = build_model(model_cfg, features_only=True, out_indices=list(det["out_indices"]))
    backbone = FPNBackbone(body, det["fpn_channels"])
    names = [str(i) for i in range(len(det["out_indices"]))]
    anchors = AnchorGenerator(tuple((s,) for s in det["anchor_sizes"]),
                              ((0.5, 1.0, 2.0),) * len(det["anchor_sizes"]))
    kwargs = dict(num_classes=det["num_classes"] + 1, min_size=det["min_size"], max_size=det["max_size"],
                  image_mean=list(mean), image_std=list(std), rpn_anchor_generator=anchors,
                  box_roi_pool=MultiScaleRoIAlign(names, 7, 2), box_detections_per_img=det["detections_per_img"],
                  rpn_post_nms_top_n_train=det["rpn_post_nms_top_n"],
                  box_batch_size_per_image=det["box_batch_size_per_image"])
    if det["type"] == "mask_rcnn":
        return MaskRCNN(backbone, mask_roi_pool=MultiScaleRoIAlign(names, 14, 2), **kwargs)
    return FasterRCNN(backbone, **kwargs)


def detector_body(detector):
    """The blocklab backbone inside a detector (where classification weights load)."""
    return detector.backbone.body
