"""Per-sample transforms (run in the workers, uint8 in and out) and the device transform.

Every random draw goes through an optional ``torch.Generator`` ``g`` and happens in
the order torchvision's transforms make it (crop parameters, then flip, then colour
jitter), so with ``g`` in the state of the global RNG the draws are torchvision's own:
``tests/test_data.py`` checks the crop parameters and, for the PIL path, the output
tensors against ``torchvision.transforms`` bit for bit.

Workers stop at uint8: ToTensor's float conversion and Normalize (and CENet's PCA
lighting, which acts between them) run on the device in :class:`DeviceTransform`.
"""
import math

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from .decode import decode_pil, decode_resized_crop, jpeg_size, pil_to_uint8, resize_uint8
from .errors import DataError

# PCA of ImageNet RGB pixels (AlexNet): eigenvalues and the eigenvector matrix as each source writes it.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = {
    # fb.resnet.torch ``transforms.lua``: eigenvectors are the columns; rgb = V @ (alpha * eigval)
    "alexnet": ((-0.5675, 0.7192, 0.4009),
                (-0.5808, -0.0045, -0.8140),
                (-0.5836, -0.6948, 0.4203)),
    # CENet ``devkit/dataset/imagenet_dataset.py`` ColorAugmentation: rgb = (eigval * alpha) @ M, rows of M
    "cenet": ((0.4009, 0.7192, -0.5675),
              (-0.8140, -0.0045, -0.5808),
              (0.4203, -0.6948, -0.5836)),
}


# ---------------------------------------------------------------- random parameters
def _uniform(low, high, g):
    return torch.empty(1).uniform_(low, high, generator=g).item()


def _randint(high, g):
    return int(torch.randint(0, high, size=(1,), generator=g).item())


def sample_resized_crop(height, width, scale, ratio, g=None):
    """(top, left, h, w) of a RandomResizedCrop: torchvision's ``get_params``, same draws in the same order."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], g)
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(height - h + 1, g)
            left = _randint(width - w + 1, g)
            return top, left, h, w
    in_ratio = float(width) / float(height)          # fallback: central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_flip(p, g=None):
    """True with probability p (RandomHorizontalFlip's draw; no draw when p == 0)."""
    return p > 0 and torch.rand(1, generator=g).item() < p


class ColorJitter:
    """torchvision's ColorJitter on uint8 CHW tensors with an explicit generator (same parameter law)."""

    def __init__(self, brightness, contrast, saturation, hue=0.0):
        self.ranges = [None if v == 0 else (max(0.0, 1 - v), 1 + v) for v in (brightness, contrast, saturation)]
        self.ranges.append(None if hue == 0 else (-hue, hue))
        self.ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)

    def __call__(self, img, g=None):
        order = torch.randperm(4, generator=g).tolist()
        factors = [None if r is None else _uniform(r[0], r[1], g) for r in self.ranges]
        for k in order:
            if factors[k] is not None:
                img = self.ops[k](img, factors[k])
        return img


# ---------------------------------------------------------------- per-sample transforms
class _Augment:
    """Flip and colour jitter shared by every training transform."""

    def __init__(self, recipe):
        self.hflip = recipe.hflip
        self.jitter = ColorJitter(*recipe.color_jitter) if recipe.color_jitter else None

    def finish(self, img, g):
        if sample_flip(self.hflip, g):
            img = img.flip(-1)
        if self.jitter is not None:
            img = self.jitter(img, g)
        return img


class FileEval:
    """Evaluation on image files: PIL decode, Resize(eval_resize), CenterCrop(input_size) -> uint8.

    With the device transform this is exactly torchvision's Resize/CenterCrop/ToTensor/Normalize.
    """

    def __init__(self, recipe):
        self.resize, self.size = recipe.eval_resize, recipe.input_size

    def __call__(self, data, g=None):
        img = decode_pil(data)
        if self.resize:
            img = TF.resize(img, [self.resize], interpolation=InterpolationMode.BILINEAR, antialias=True)
        return pil_to_uint8(TF.center_crop(img, [self.size, self.size]))


class FileTrain(_Augment):
    """Training on image files: RandomResizedCrop (or the eval crop) + flip (+ colour jitter) -> uint8.

    fast_decode: crop sampled from the header's size, then :func:`decode_resized_crop`;
    otherwise PIL decode + ``resized_crop`` on the PIL image, like torchvision's reference.
    """

    def __init__(self, recipe):
        super().__init__(recipe)
        self.crop, self.scale, self.ratio, self.fast = recipe.crop, recipe.scale, recipe.ratio, recipe.fast_decode
        self.out = (recipe.input_size, recipe.input_size)
        self.eval = FileEval(recipe)

    def __call__(self, data, g=None):
        if self.crop == "none":
            img = self.eval(data)
        else:
            size = jpeg_size(data) if self.fast else None
            if size is not None:
                box = sample_resized_crop(size[1], size[0], self.scale, self.ratio, g)
                img = decode_resized_crop(data, size, box, self.out)
            else:
                pil = decode_pil(data)
                top, left, h, w = sample_resized_crop(pil.size[1], pil.size[0], self.scale, self.ratio, g)
                pil = TF.resized_crop(pil, top, left, h, w, list(self.out),
                                      interpolation=InterpolationMode.BILINEAR, antialias=True)
                img = pil_to_uint8(pil)
        return self.finish(img, g)


class ArrayEval:
    """Evaluation on in-memory uint8 images: resize/center-crop only when the size differs."""

    def __init__(self, recipe):
        self.resize, self.size = recipe.eval_resize, recipe.input_size

    def __call__(self, img, g=None):
        if self.resize:
            h, w = img.shape[-2:]
            short = self.resize
            img = resize_uint8(img, (short, int(short * w / h)) if h <= w else (int(short * h / w), short))
            return TF.center_crop(img, [self.size, self.size])
        return resize_uint8(img, (self.size, self.size))


class ArrayTrain(_Augment):
    """Training on in-memory uint8 images: pad crop (RandomCrop(size, padding)), RandomResizedCrop or none."""

    def __init__(self, recipe):
        super().__init__(recipe)
        self.crop, self.scale, self.ratio, self.pad = recipe.crop, recipe.scale, recipe.ratio, recipe.padding
        self.size = recipe.input_size
        self.eval = ArrayEval(recipe)

    def __call__(self, img, g=None):
        s = self.size
        if self.crop == "pad":
            img = resize_uint8(img, (s, s))
            p = self.pad
            img = F.pad(img, (p, p, p, p))
            top, left = _randint(img.shape[-2] - s + 1, g), _randint(img.shape[-1] - s + 1, g)
            img = img[:, top:top + s, left:left + s]
        elif self.crop == "random_resized":
            top, left, h, w = sample_resized_crop(img.shape[-2], img.shape[-1], self.scale, self.ratio, g)
            img = resize_uint8(img[:, top:top + h, left:left + w], (s, s))
        else:
            img = self.eval(img)
        return self.finish(img, g)


# ---------------------------------------------------------------- device side
class DeviceTransform(torch.nn.Module):
    """uint8 NCHW batch on the device -> normalised float batch.

    Computes ``x.float() / 255`` (ToTensor), adds CENet's PCA lighting per sample when
    ``lighting > 0`` (training only; CENet applies it between ToTensor and Normalize), then
    ``(x - mean) / std`` (Normalize) with the same float32 operations as torchvision, so
    evaluation batches equal the reference pipeline's bit for bit. Lighting draws from
    the global RNG of the batch's device, which the engine seeds.
    """

    def __init__(self, mean, std, lighting=0.0, lighting_layout="alexnet", channels_last=False):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.lighting, self.layout, self.channels_last = float(lighting), lighting_layout, channels_last
        vec = torch.tensor(PCA_EIGVEC[lighting_layout], dtype=torch.float32)
        # both layouts become rgb = (alpha * eigval) @ basis
        self.register_buffer("basis", vec.t().contiguous() if lighting_layout == "alexnet" else vec, persistent=False)
        self.register_buffer("eigval", torch.tensor(PCA_EIGVAL, dtype=torch.float32), persistent=False)

    def forward(self, x):
        if x.dtype != torch.uint8:
            raise DataError(f"the device transform expects the uint8 batches of data.build_loader, got {x.dtype}")
        if self.mean.device != x.device:
            self.to(x.device)
        x = x.float().div_(255)
        if self.lighting > 0:
            alpha = torch.randn(x.shape[0], 3, device=x.device) * self.lighting
            x = x + ((alpha * self.eigval) @ self.basis).view(-1, 3, 1, 1)
        x = x.sub_(self.mean).div_(self.std)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)

    def extra_repr(self):
        return (f"mean={tuple(round(v, 4) for v in self.mean.flatten().tolist())}, "
                f"std={tuple(round(v, 4) for v in self.std.flatten().tolist())}, lighting={self.lighting}"
                f"{' (' + self.layout + ')' if self.lighting else ''}, channels_last={self.channels_last}")
