"""COCO's own evaluation (pycocotools COCOeval) of a detector over a sharded validation set.

Each rank runs the *unwrapped* model on its shard (ShardSampler: no padding), turns the outputs into COCO
result entries (``[x, y, w, h]`` boxes in the original image's pixels, the annotation file's category ids,
RLE masks for Mask R-CNN), and one ``all_gather_object`` brings every rank's (image ids, results) together.
Rank 0 checks that every validation image came exactly once, runs COCOeval per IoU type and broadcasts the
numbers: ``{bbox_AP, bbox_AP50, bbox_AP75, bbox_APs, bbox_APm, bbox_APl, (segm_...), count}`` in COCO's
own [0, 1] scale, plus ``table`` (COCOeval's standard summary lines).
"""
import contextlib
import io
import json

import numpy as np
import torch

from engine import distributed as du
from engine.checkpoint import atomic_write
from engine.evaluator import autocast_for

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_results(output, image_id, cat_ids):
    """COCO result entries of one image's detector output (``cat_ids[label - 1]`` is the category id)."""
    boxes = output["boxes"].float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    scores, labels = output["scores"].float().tolist(), output["labels"].tolist()
    results = [{"image_id": image_id, "category_id": cat_ids[lab - 1], "bbox": [round(v, 2) for v in box],
                "score": round(s, 5)} for box, s, lab in zip(xywh, scores, labels)]
    if "masks" in output:
        from pycocotools import mask as mask_utils
        binary = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        for r, m in zip(results, binary):
            rle = mask_utils.encode(np.asfortranarray(m))
            r["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return results


def summarize(coco_gt, results, iou_types, image_ids):
    """(metrics, standard table text) of COCOeval over ``image_ids`` for each IoU type."""
    from pycocotools.cocoeval import COCOeval
    metrics, table = {}, []
    for iou in iou_types:
        if not results:  # loadRes refuses an empty list: no detections is AP 0
            metrics.update({f"{iou}_{k}": 0.0 for k in STATS})
            table.append(f"{iou}: no detections")
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            dt = coco_gt.loadRes(results)
            ev = COCOeval(coco_gt, dt, iou)
            ev.params.imgIds = sorted(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        lines = [ln for ln in out.getvalue().splitlines() if ln.lstrip().startswith("Average")]
        table.append(f"{iou}:\n" + "\n".join(lines))
        # COCOeval writes -1 where a size range has no ground truth: report 0 there (no NaN in metrics.jsonl)
        metrics.update({f"{iou}_{k}": max(float(v), 0.0) for k, v in zip(STATS, ev.stats[:6])})
    return metrics, "\n".join(table)


@torch.no_grad()
def evaluate_coco(model, loader, device, transform, amp, iou_types=("bbox",), results_path=None, on_batch=None):
    """COCO metrics of ``model`` over ``loader``'s dataset (a data.coco.CocoDetection), every image once.

    ``results_path``: rank 0 also writes the gathered result entries there (COCO results JSON);
    ``on_batch(i)`` is called after batch i, as engine.evaluator.evaluate does (a stop can end the pass there).
    """
    dataset = loader.dataset
    was_training = model.training
    model.eval()
    seen, results = [], []
    for index, (images, targets) in enumerate(loader):
        images = transform(images.to(device, non_blocking=True))
        with autocast_for(device, amp):
            outputs = model(images)
        for out, target in zip(outputs, targets):
            seen.append(int(target["image_id"]))
            results += to_coco_results(out, seen[-1], dataset.cat_ids)
        if on_batch is not None:
            on_batch(index)
    model.train(was_training)
    parts = [(seen, results)]
    if du.is_dist():
        parts = [None] * du.get_world_size()
        torch.distributed.all_gather_object(parts, (seen, results))
    answer = None
    if du.is_main():
        ids = [i for p in parts for i in p[0]]
        if len(ids) != len(set(ids)) or set(ids) != set(dataset.ids):
            answer = (f"evaluation saw {len(ids)} images ({len(set(ids))} distinct) of the {len(dataset.ids)} "
                      f"in {dataset.ann_file}: the sampler must give each image exactly once")
        else:
            everything = [r for p in parts for r in p[1]]
            metrics, table = summarize(dataset.coco, everything, iou_types, ids)
            if results_path is not None:
                atomic_write(results_path, lambda f: f.write(json.dumps(everything).encode()),
                             fix="pass --out FILE in a writable folder")
            answer = dict(metrics, count=len(ids), table=table)
    answer = du.broadcast_object(answer)  # every rank returns (or raises) alike
    if isinstance(answer, str):
        raise RuntimeError(answer)
    return answer
