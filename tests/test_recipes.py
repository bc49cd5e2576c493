"""Every config that names an original repository trains and evaluates with that repository's recipe.

The tables below are written from the original code at its last commit, each row citing file and line:
Tangshitao/CENet (``imagenet/``, ``devkit/``), megvii-research/ED-Net, and
Ridwan230/pytorch-classification-weight-excitation ("WE"). A test resolves each config and checks it
against its table: epochs, global and per-process batch, the LR at the first step, the end of warmup and
every decay boundary, the optimizer and which parameters get weight decay, label smoothing, augmentation
and evaluation crop, and the initial value law of every parameter. Where a config deliberately differs
(steps per epoch), the test checks that the config's comment says so.
"""
import math
import os
import re

import pytest
import torch
import torch.nn as nn

from data.recipe import build_recipe
from data.transforms import PCA_EIGVAL, PCA_EIGVEC
from engine.config import load_config
from engine.optim import build_optimizer, lr_factor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_TRAIN = 1281167          # images in ILSVRC-2012 train
K = 1000


# ----------------------------------------------------------------------------- the originals' LR laws

def cenet_lr(epoch, i, ipe):
    """devkit/core/lr_scheduler.py:66-82 with the YAML's base_lr 0.1, warmup 5 epochs from warmup_lr 0.0,
    step 30,60,90 x0.1 (imagenet/configs/config_resnetv1ce50_step_moving_average.yaml:7-13)."""
    t, warmup = epoch * ipe + i, 5 * ipe
    if warmup > t:
        return 0.0 + (0.1 - 0.0) * t / warmup
    return 0.1 * 0.1 ** sum(1 for s in (30, 60, 90) if s <= epoch)


def ednet_lr(epoch, i, ipe):
    """imagenet_train.py:343-348: lr * 0.1 ** (epoch // schedule), README command --lr 0.1 --schedule 30."""
    return 0.1 * 0.1 ** (epoch // 30)


def we_lr(schedule):
    """imagenet.py:404-409: lr *= gamma (0.1) at the start of each epoch listed in --schedule; lr 0.1 (:60)."""
    return lambda epoch, i, ipe: 0.1 * 0.1 ** sum(1 for s in schedule if s <= epoch)


# ----------------------------------------------------------------------------- recipes per repository

CENET = dict(
    epochs=100, batch=256, procs=8,   # config yaml:4-5; train_val.sh:3 --nproc_per_node=8,
                                      # 32 per GPU (train_imagenet.py:133)
    lr=cenet_lr, warmup=5,            # lr_scheduler.py:66-82 (see cenet_lr)
    momentum=0.9, weight_decay=1e-4,  # yaml:15-16; train_imagenet.py:86-88: SGD(model.parameters()), no nesterov
    smoothing="others",               # train_imagenet.py:36-51, 84: 0.9 on the target, 0.1/(K-1) on the others
    lighting=(0.1, "cenet"),          # train_imagenet.py:116 ColorAugmentation(); imagenet_dataset.py:39-57 (std 0.1)
    sampler_keeps_last=True,          # train_imagenet.py:129-134: DistributedSampler, drop_last False
)
EDNET = dict(
    epochs=100, batch=256, procs=8,   # README command -b 256 --epochs 100; procs ours: ED-Net runs one process with
                                      # DataParallel over an unstated GPU count (imagenet_train.py:109)
    lr=ednet_lr, warmup=0,            # README --lr 0.1 --schedule 30; imagenet_train.py:343-348
    momentum=0.9, weight_decay=1e-4,  # imagenet_train.py:43-44, 113-115: SGD(model.parameters())
    smoothing=None,                   # imagenet_train.py:112: nn.CrossEntropyLoss()
    lighting=(0.0, None),             # imagenet_train.py:132-138: RandomResizedCrop(224) + flip only
    sampler_keeps_last=True,          # imagenet_train.py:182: DataLoader(batch_size=256), drop_last False
)


def we(epochs, schedule, batch):
    return dict(
        epochs=epochs, batch=batch, procs=4,  # README.md:22 "4 GPUs ... are assumed"; imagenet.py:170 DataParallel
        lr=we_lr(schedule), warmup=0,         # imagenet.py:60, 64-67, 404-409
        momentum=0.9, weight_decay=1e-4,      # imagenet.py:68-71, 178-179: SGD(model.parameters())
        smoothing=None,                       # imagenet.py:177: nn.CrossEntropyLoss()
        lighting=(0.0, None),                 # imagenet.py:133-141: RandomResizedCrop(224) + flip only
        sampler_keeps_last=True)              # imagenet.py:140: shuffle=True, drop_last False


WE_R50 = we(90, (30, 60), 256)            # README.md:26 --epochs 90 --schedule 30 60; imagenet.py:56 batch 256
WE_R101 = we(100, (30, 60, 90), 128)      # README.md:30: l_resnet101 --epochs 100 --schedule 30 60 90 --train-batch 128
# (ResNet-18/34 and WE+SE borrow WE_R50's command, ResNet-152 WE_R101's: the README gives none for them)
WE_X50 = we(100, (30, 60, 90), 128)       # README.md:34: l_resnext50 ... --train-batch 128 (arch not in its code)
OURS_X101 = we(100, (30, 60, 90), 256)    # ours: README.md:39 gives no schedule (imagenet.py:52, 64 never decay)

# ----------------------------------------------------------------------------- initial value laws
# (regex on our parameter name, law); the first match wins; every parameter must match a row.

BN = [(r"(bn\d|_bn|downsample\.1)\.weight$", "ones"), (r"(bn\d|_bn|downsample\.1)\.bias$", "zeros")]
CONV = [(r"(conv\d?|_conv|downsample\.0)\.weight$", "kaiming_fan_out")]
LAW_CENET = [                                             # imagenet/models/resnet_v1_ce.py, devkit/ops/CE_module.py
    (r"ce\.theta$", "zeros"),                             # CE_module.py:65 x_weight = zeros(1)
    (r"ce\.ir\.norm\.weight$", "ones"), (r"ce\.ir\.norm\.bias$", "zeros"),   # CE_module.py:9 nn.LayerNorm default
    (r"ce\.ir\.fc[12]\.weight$", "uniform_fan_in"),      # CE_module.py:8, 11 nn.Linear(bias=False) default
    (r"se\.fc[12]\.(weight|bias)$", "uniform_fan_in"),  # ours, CENet has no SE: PyTorch's default (blocks init
                                                          # themselves; CENet's loop :152-155 would redraw convs)
    *BN,                                                  # resnet_v1_ce.py:156-158 every BN weight 1, bias 0
    (r"^fc\.(weight|bias)$", "uniform_fan_in"),           # resnet_v1_ce.py:150 nn.Linear default (loop skips it)
    *CONV,                                                # resnet_v1_ce.py:152-155 normal(0, sqrt(2 / (k*k*out)))
]
LAW_EDNET = [                                             # ed_resnet.py:101-108 (same loop in ed_resnext/ed_se_*)
    (r"\.bias$", "zeros"),                                # :107-108 every bias 0: BN, fc and SE's
    (r"(bn\d|_bn|downsample\.1)\.weight$", "ones"),       # :105-106 'bn' keys 1
    (r"se\.fc[12]\.weight$", "uniform_fan_in"),           # ed_se_resnet.py:50-51 nn.Linear default (no 'conv' key)
    (r"^fc\.weight$", "uniform_fan_in"),                  # :99 nn.Linear default
    *CONV,                                                # :103-104 kaiming_normal(mode='fan_out') on 'conv' keys
]
LAW_TORCHVISION = [                                       # ED-Net's baselines: no released code; torchvision's init
    *BN, (r"se\.fc[12]\.(weight|bias)$", "uniform_fan_in"), (r"^fc\.(weight|bias)$", "uniform_fan_in"), *CONV]
LAW_WE = [                                                # models/imagenet/resnet.py, models/layers.py
    (r"lwe\.fc[12]\.(weight|bias)$", "uniform_fan_in"),  # layers.py:225-228 nn.Conv2d default (resnet.py:109 skips it)
    *BN,                                                  # resnet.py:112-114
    (r"^fc\.(weight|bias)$", "uniform_fan_in"),           # resnet.py:106 nn.Linear default
    *CONV,                                                # resnet.py:108-111 kaiming_normal_(fan_out, relu)
]

# config -> (recipe, the model section it must resolve to, init law)
ED_ARGS = {"zero_init_bias": True}
CONFIGS = {
    "cenet/ce_resnet50.yaml": (CENET, ("resnet50", {}, "plain", ["ce"]), LAW_CENET),
    "cenet/resnet50.yaml": (CENET, ("resnet50", {}, "plain", []), LAW_CENET),
    "we/we_resnet50.yaml": (WE_R50, ("resnet50", {}, "we+mwe", []), LAW_WE),
    "we/werepo_l_resnet50.yaml": (WE_R50, ("resnet50", {}, "we", []), LAW_WE),
    "we/resnet50.yaml": (WE_R50, ("resnet50", {}, "plain", []), LAW_WE),
    "we/we_resnet101.yaml": (WE_R101, ("resnet101", {}, "we+mwe", []), LAW_WE),
    "we/werepo_l_resnet101.yaml": (WE_R101, ("resnet101", {}, "we", []), LAW_WE),
    "we/resnet101.yaml": (WE_R101, ("resnet101", {}, "plain", []), LAW_WE),
    "we/we_resnext50.yaml": (WE_X50, ("resnext50_32x4d", {}, "we+mwe", []), LAW_WE),
    "we/resnext50.yaml": (WE_X50, ("resnext50_32x4d", {}, "plain", []), LAW_WE),
    "we/we_resnext101.yaml": (OURS_X101, ("resnext101_32x4d", {}, "we+mwe", []), LAW_WE),
    "we/resnext101.yaml": (OURS_X101, ("resnext101_32x4d", {}, "plain", []), LAW_WE),
}
for depth in (18, 34, 50, 101):    # the CE paper's plain / SE / CE rows on CENet's recipe
    CONFIGS[f"cenet/se_resnet{depth}.yaml"] = (CENET, (f"resnet{depth}", {}, "plain", ["se"]), LAW_CENET)
    if depth != 50:
        CONFIGS[f"cenet/resnet{depth}.yaml"] = (CENET, (f"resnet{depth}", {}, "plain", []), LAW_CENET)
        CONFIGS[f"cenet/ce_resnet{depth}.yaml"] = (CENET, (f"resnet{depth}", {}, "plain", ["ce"]), LAW_CENET)
for depth, recipe in ((18, WE_R50), (34, WE_R50), (152, WE_R101)):
    CONFIGS[f"we/we_resnet{depth}.yaml"] = (recipe, (f"resnet{depth}", {}, "we+mwe", []), LAW_WE)
    CONFIGS[f"we/werepo_l_resnet{depth}.yaml"] = (recipe, (f"resnet{depth}", {}, "we", []), LAW_WE)
    CONFIGS[f"we/resnet{depth}.yaml"] = (recipe, (f"resnet{depth}", {}, "plain", []), LAW_WE)
CONFIGS["we/se_resnet50.yaml"] = (WE_R50, ("resnet50", {}, "plain", ["se"]), LAW_WE + LAW_TORCHVISION)
CONFIGS["we/we_se_resnet50.yaml"] = (WE_R50, ("resnet50", {}, "we+mwe", ["se"]), LAW_WE + LAW_TORCHVISION)
for name, arch in (("resnet50", "resnet50"), ("resnet101", "resnet101"), ("resnet152", "resnet152"),
                   ("resnext50", "resnext50_32x4d"), ("resnext101", "resnext101_32x4d")):
    for suffix in ("", "_a", "_b"):
        CONFIGS[f"ednet/ed_{name}{suffix}.yaml"] = (EDNET, (arch, ED_ARGS, "plain", ["ed"]), LAW_EDNET)
    CONFIGS[f"ednet/{name}.yaml"] = (EDNET, (arch, {}, "plain", []), LAW_TORCHVISION)
    if name != "resnet152":
        CONFIGS[f"ednet/ed_se_{name}.yaml"] = (EDNET, (arch, ED_ARGS, "plain", ["se", "ed"]), LAW_EDNET)
        CONFIGS[f"ednet/se_{name}.yaml"] = (EDNET, (arch, {}, "plain", ["se"]), LAW_TORCHVISION)


def _cfg(path):
    return load_config(os.path.join(ROOT, "configs", "imagenet", path))


def _text(path):
    with open(os.path.join(ROOT, "configs", "imagenet", path)) as f:
        return f.read()


def test_every_repository_config_has_a_recipe_row():
    named = []
    for sub in ("cenet", "ednet", "we"):
        named += [f"{sub}/{n}" for n in os.listdir(os.path.join(ROOT, "configs", "imagenet", sub))]
    assert sorted(named) == sorted(CONFIGS)


@pytest.mark.parametrize("path", sorted(CONFIGS))
def test_recipe(path):
    recipe, (backbone, backbone_args, conv, plugins), _ = CONFIGS[path]
    cfg, text = _cfg(path), _text(path)
    tr = cfg.train
    # model section
    assert cfg.model.backbone == backbone and dict(cfg.model.backbone_args) == backbone_args
    conv_cfg = dict(cfg.model.conv)
    assert {"plain": {"type": "plain"}, "we": {"type": "we", "lwe": True, "mwe": False, "ws": False},
            "we+mwe": {"type": "we", "lwe": True, "mwe": True, "ws": False}}[conv] == conv_cfg
    assert [p["type"] for p in cfg.model.plugins] == plugins
    # epochs, batch, processes
    assert tr.epochs == recipe["epochs"] and tr.batch_size == recipe["batch"] and tr.accum_steps == 1
    procs = recipe["procs"]
    assert f"./train.sh THIS {procs}" in text, "the config must say how many processes reproduce the original"
    per_process = tr.batch_size // procs
    assert per_process * procs == tr.batch_size
    # steps per epoch: the original keeps the last incomplete batch; we drop it and the comment says so
    ours = math.ceil(IMAGENET_TRAIN / procs) // per_process
    theirs = math.ceil(IMAGENET_TRAIN / tr.batch_size)
    assert theirs == ours + 1 and recipe["sampler_keeps_last"]
    assert f"{ours} steps per epoch, not {theirs}" in text, "say in the config that the last batch is dropped"
    # LR at the first step, around the end of warmup and around every decay boundary, and the last step
    ipe = ours
    epochs = sorted({0, recipe["warmup"], *tr.milestones, tr.epochs - 1} - {tr.epochs})
    points = [(0, 0), (0, 1), (tr.epochs - 1, ipe - 1)]
    for e in epochs:
        points += [(e, 0), (max(e - 1, 0), ipe - 1)]
    for epoch, i in points:
        ours_lr = tr.lr * lr_factor(epoch * ipe + i, tr, ipe)
        assert ours_lr == pytest.approx(recipe["lr"](epoch, i, ipe), rel=1e-12, abs=1e-15), (epoch, i)
    # optimizer: plain SGD, momentum, weight decay on every parameter
    assert tr.optimizer == "sgd" and tr.momentum == recipe["momentum"] and not tr.nesterov
    assert tr.weight_decay == recipe["weight_decay"] and list(tr.wd_exempt) == [] and tr.clip_grad_norm is None
    assert not tr.ema and tr.amp == "none" and not tr.sync_bn
    # loss
    _check_smoothing(tr.label_smoothing, recipe["smoothing"])
    # augmentation and evaluation
    r = build_recipe(cfg.data)
    assert (r.input_size, r.eval_resize, r.crop, r.scale, r.ratio, r.hflip, r.color_jitter) == \
        (224, 256, "random_resized", (0.08, 1.0), (3 / 4, 4 / 3), 0.5, None)      # RandomResizedCrop(224) defaults
    assert (r.mean, r.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    lighting, layout = recipe["lighting"]
    assert r.lighting == lighting and (not lighting or r.lighting_layout == layout)


def _check_smoothing(eps_ours, kind):
    """Our loss (PyTorch's label_smoothing) against the original's, on random logits in float64."""
    torch.manual_seed(0)
    logits, target = torch.randn(6, K, dtype=torch.float64), torch.randint(0, K, (6,))
    ours = nn.CrossEntropyLoss(label_smoothing=eps_ours)(logits, target)
    logp = logits.log_softmax(-1)
    if kind == "others":   # CENet train_imagenet.py:45-51 with smoothing 0.1
        true = torch.full_like(logp, 0.1 / (K - 1)).scatter_(1, target[:, None], 0.9)
        theirs = torch.mean(torch.sum(-true * logp, dim=-1))
    else:
        theirs = nn.functional.nll_loss(logp, target)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-13)


def test_cenet_pca_lighting_constants():
    """devkit/dataset/imagenet_dataset.py:42-48 (eigenvectors as rows, rgb = (eigval * alpha) @ M)."""
    assert PCA_EIGVAL == (0.2175, 0.0188, 0.0045)
    assert PCA_EIGVEC["cenet"] == ((0.4009, 0.7192, -0.5675), (-0.8140, -0.0045, -0.5808), (0.4203, -0.6948, -0.5836))


def _law_ok(law, p, fan_in, fan_out):
    x = p.detach().double().flatten()
    if law == "ones":
        return bool((x == 1).all())
    if law == "zeros":
        return bool((x == 0).all())
    if law == "uniform_fan_in":            # PyTorch's Linear/Conv default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1 / math.sqrt(fan_in)
        spread = x.abs().max() > 0.5 * bound if x.numel() >= 16 else x.abs().max() > 0
        return bool(x.abs().max() <= bound) and bool(spread)
    if law == "kaiming_fan_out":           # N(0, 2 / fan_out)
        ratio = (x ** 2).mean() / (2 / fan_out)
        return x.numel() < 2000 or bool(0.85 < ratio < 1.15 and abs(x.mean()) < 0.1 * math.sqrt(2 / fan_out))
    raise AssertionError(law)


# one model per init code path (deeper models and -A/-B variants share it; test_recipe checks their model sections)
BUILT = ["cenet/ce_resnet50.yaml", "cenet/resnet50.yaml", "ednet/ed_resnet50.yaml", "ednet/ed_se_resnext50.yaml",
         "ednet/se_resnet50.yaml", "we/werepo_l_resnet50.yaml", "cenet/ce_resnet18.yaml", "cenet/se_resnet18.yaml",
         "we/we_se_resnet50.yaml"]


@pytest.mark.parametrize("path", BUILT)
def test_initial_values_and_weight_decay(path):
    from models import build_model
    law, cfg = CONFIGS[path][2], _cfg(path)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    params = dict(model.named_parameters())
    for name, p in params.items():
        rule = next((kind for pattern, kind in law if re.search(pattern, name)), None)
        assert rule is not None, f"{path}: no init law for parameter {name}; add a row citing the original"
        weight = params[name[:-len("bias")] + "weight"] if name.endswith("bias") else p
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight) if weight.dim() > 1 else (1, 1)
        assert _law_ok(rule, p, fan_in, fan_out), f"{path}: {name} does not follow {rule}"
    # all three originals pass model.parameters() to one SGD with weight_decay 1e-4 (no exemptions)
    opt = build_optimizer(model, cfg.train)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 1e-4 for p in g["params"]}
    assert decayed == {id(p) for p in model.parameters()}
    assert all(g["momentum"] == 0.9 and not g["nesterov"] and g["dampening"] == 0 for g in opt.param_groups)


# ----------------------------------------------------------------------------- ShuffleNetV2 rows
# The CE paper's ShuffleNetV2 rows borrow the ShuffleNetV2 authors' recipe, megvii-model/ShuffleNet-Series
# ShuffleNetV2/train.py (defaults read from its fork dypromise/ShuffleNet-Series; the original file is not in our
# store) and ShuffleNetV2/utils.py: batch 1024, lr 0.5, LambdaLR 1 - step / 300000 per iteration, momentum 0.9,
# weight decay 4e-5 through get_parameters (decay only 'weight' tensors with more than one dimension),
# CrossEntropyLabelSmooth(1000, 0.1), RandomResizedCrop(224) + ColorJitter(0.4, 0.4, 0.4) + flip.
SHUFFLE = ["shufflenet/shufflenet_v2_x1_0.yaml", "shufflenet/shufflenet_v2_x0_5.yaml",
           "shufflenet/ce_shufflenet_v2_x1_0.yaml", "shufflenet/se_shufflenet_v2_x1_0.yaml",
           "shufflenet/ce_shufflenet_v2_x0_5.yaml", "shufflenet/se_shufflenet_v2_x0_5.yaml"]


def test_every_shufflenet_config_has_a_recipe_row():
    assert sorted(f"shufflenet/{n}" for n in os.listdir(os.path.join(ROOT, "configs", "imagenet", "shufflenet"))) == \
        sorted(SHUFFLE)


@pytest.mark.parametrize("path", SHUFFLE)
def test_shufflenet_recipe(path):
    from models import build_model
    cfg, text = _cfg(path), _text(path)
    tr = cfg.train
    assert cfg.model.backbone == "shufflenet_v2_" + path.rsplit("_v2_", 1)[1][:-len(".yaml")]
    assert (tr.batch_size, tr.lr, tr.momentum, tr.nesterov, tr.weight_decay) == (1024, 0.5, 0.9, False, 4e-5)
    assert "./train.sh THIS 8" in text
    ipe = IMAGENET_TRAIN // tr.batch_size            # 1251: 8 processes x 128, last incomplete batch dropped
    total = tr.epochs * ipe
    assert abs(total - 300000) / 300000 < 0.001 and f"{ipe} steps per epoch ({total} steps, theirs 300000)" in \
        _text("shufflenet/shufflenet_v2_x1_0.yaml")
    for t in (0, 1, ipe * 30 + 7, total // 2, total - 1):    # train.py LambdaLR, with our step count
        assert tr.lr * lr_factor(t, tr, ipe) == pytest.approx(0.5 * (1 - t / total), rel=1e-9, abs=1e-12), t
    assert tr.label_smoothing == 0.1 and not tr.ema and tr.amp == "none"   # utils.py CrossEntropyLabelSmooth:
    r = build_recipe(cfg.data)                                             # eps / K on every class, as PyTorch's
    assert (r.input_size, r.eval_resize, r.crop, r.hflip, r.color_jitter) == (224, 256, "random_resized", 0.5, (0.4, 0.4, 0.4, 0.0))
    torch.manual_seed(0)
    model = build_model(dict(cfg.model, num_classes=10))
    opt = build_optimizer(model, tr)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 4e-5 for p in g["params"]}
    theirs = {id(p) for n, p in model.named_parameters() if "weight" in n and p.dim() > 1}   # get_parameters
    assert decayed == theirs
