"""Meters that stay on the device: sums are accumulated as tensors and read at log time only.

``topk_correct`` counts correct top-k predictions without a host sync; a
:class:`SumMeter` keeps ``[loss_sum, top1, top5, count]`` on the device so the
training hot path never calls ``.item()``; :class:`Throughput` times steps on
the host (data wait vs. total) for the console and ETA.
"""
import time

import torch


def topk_correct(logits, target, ks=(1, 5)):
    """Number of samples whose target is among the top-k logits, for each k (a float tensor)."""
    kmax = min(max(ks), logits.shape[1])
    pred = logits.topk(kmax, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    cum = hit.cumsum(dim=1).sum(dim=0, dtype=torch.float32)  # cum[k-1] = correct within top-k
    return torch.stack([cum[min(k, kmax) - 1] for k in ks])


class SumMeter:
    """Running sums ``[loss_sum, top1, top5, count]`` on ``device``; ``read()`` syncs once."""

    def __init__(self, device):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, loss, logits, target):
        n = target.shape[0]
        correct = topk_correct(logits.detach(), target)
        self.sums += torch.cat([(loss.detach().double() * n).view(1), correct.double(),
                                self.sums.new_tensor([n])])

    def reset(self):
        self.sums.zero_()

    def read(self):
        loss, top1, top5, n = self.sums.tolist()
        n = max(n, 1.0)
        return {"loss": loss / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


class Throughput:
    """Host-side step timing: data wait, step time and images/s since the last ``read``."""

    def __init__(self):
        self.reset()
        self.last = time.perf_counter()

    def reset(self):
        self.data, self.steps, self.images, self.start = 0.0, 0, 0, time.perf_counter()

    def data_ready(self):
        now = time.perf_counter()
        self.data += now - self.last
        self.last = now

    def step_done(self, images):
        self.steps += 1
        self.images += images
        self.last = time.perf_counter()

    def read(self):
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        steps = max(self.steps, 1)
        out = {"data_time": self.data / steps, "step_time": elapsed / steps, "img_s": self.images / elapsed,
               "steps": self.steps, "elapsed": elapsed}
        self.reset()
        return out


def format_eta(seconds):
    seconds = int(max(seconds, 0))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{d}d " if d else "") + f"{h:d}:{m:02d}:{s:02d}"
