"""The ``model`` section of the config: which backbone, which conv, which plug-ins."""
from core.fields import ConfigError, Field, at_least


def _stage_index(value, path):
    if value < -1:
        raise ConfigError(f"{path}={value!r} must be >= -1 (-1: nothing frozen, 0: the stem, k: stem + stages 1..k)")

MODEL_SCHEMA = {
    "backbone": Field("resnet50", "backbone name: resnet18/34/50/101/152, resnext50_32x4d, "
                      "resnext101_32x4d, resnext101_32x8d, mobilenet_v2, "
                      "shufflenet_v2_x0_5/x1_0/x1_5/x2_0, cifar_resnet20/32/44/56/110"),
    "num_classes": Field(1000, "classifier outputs; checked against the dataset's class count"),
    "backbone_args": Field({}, "extra backbone arguments, e.g. {width_mult: 0.75} for mobilenet_v2, "
                           "{shortcut: B} for CIFAR ResNets, {zero_init_residual: true} for ResNets"),
    "conv": Field({"type": "plain"}, "conv factory: {type: plain} or {type: we, lwe: true, mwe: true, "
                  "ws: false, exclude: [roles]}; roles: stem, regular, depthwise, downsample, head"),
    "plugins": Field([], "plug-in blocks, applied in order: [{type: ce|ed|se, position: after_norm|parallel, "
                     "stages: [1, 2, 3], stem: false, <block options>}]"),
}
MODEL_SCHEMA.update({
    "features_only": Field(False, "the model returns feature maps for dense prediction (an OrderedDict '0', "
                           "'1', ... of the maps at out_indices; no classifier), see docs/dense_prediction.md"),
    "out_indices": Field(None, "features_only: which maps, increasing, e.g. [1, 2, 3, 4] for ResNet strides "
                         "4-32 (0 = the stem); null = all of the backbone's feature_info", type=list, nullable=True),
    "pretrained": Field(None, "weights to start from: a path, a model-zoo name or a URL (ours, torchvision's, "
                        "or the CENet / ED-Net / WE repositories' checkpoints)", type=str, nullable=True),
    "pretrained_ignore": Field([], "glob patterns of model keys to leave at their initialisation instead of "
                               "loading them from 'pretrained' (e.g. ['fc.*'] for a new head with the "
                               "checkpoint's class count); other mismatches are errors"),
    "frozen_stages": Field(-1, "fine-tuning: freeze the stem (0) and stages 1..k (k): no gradients, modules kept "
                           "in eval mode (BN/CE statistics fixed); -1: nothing frozen", type=int,
                           check=_stage_index),
    "norm_eval": Field(False, "fine-tuning: keep every BatchNorm (and CE) layer in eval mode while training: "
                       "running statistics fixed, affine parameters still trained"),
})


def _anchor_sizes(value, path):
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value) \
            or list(value) != sorted(value):
        raise ConfigError(f"{path}={value!r} must be increasing positive integers, one per FPN level "
                          f"(len(out_indices) + 1 with the pooled level), e.g. [32, 64, 128, 256, 512]")


# task: detection reads this section; `model` is then the detector's body (features_only is implied)
DETECTOR_SCHEMA = {
    "type": Field("faster_rcnn", "torchvision detector around the FPN over model's backbone: faster_rcnn (boxes) "
                  "or mask_rcnn (boxes and instance masks)", choices=("faster_rcnn", "mask_rcnn")),
    "num_classes": Field(80, "object categories (the background class is added); must equal the annotation "
                         "file's category count", type=int, check=at_least(1)),
    "out_indices": Field([1, 2, 3, 4], "backbone maps the FPN takes (model.out_indices for the body), finest "
                         "first; ResNets: [1, 2, 3, 4] = C2-C5 (strides 4-32)", type=list),
    "fpn_channels": Field(256, "FPN output channels", type=int, check=at_least(1)),
    "anchor_sizes": Field([32, 64, 128, 256, 512], "RPN anchor size per FPN level (one per out_indices entry "
                          "plus the pooled level), aspect ratios 0.5/1/2", type=list, check=_anchor_sizes),
    "min_size": Field(800, "images are resized so the shorter side is this, unless the longer side would exceed "
                      "max_size (torchvision's GeneralizedRCNNTransform)", type=int, check=at_least(1)),
    "max_size": Field(1333, "upper bound of the resized longer side", type=int, check=at_least(1)),
    "rpn_post_nms_top_n": Field(2000, "RPN proposals kept per image in training (torchvision/Detectron: 2000; "
                                "1000 in evaluation)", type=int, check=at_least(1)),
    "box_batch_size_per_image": Field(512, "RoIs sampled per image for the box head's loss (Detectron: 512)",
                                      type=int, check=at_least(1)),
    "detections_per_img": Field(100, "detections kept per image (COCO evaluates 100)", type=int,
                                check=at_least(1)),
}
