"""The engine's config sections (train, eval, runtime, dist) and the full SCHEMA.

Every key has a default and a one-line doc; ``python -m engine.schema`` prints
the whole reference (model and data sections included) as a Markdown table.
Sizes in the train section are global: ``train.batch_size`` is summed over all
processes and accumulation steps, and ``train.lr`` is the learning rate for that
batch (no implicit scaling: a recipe states its own lr and batch).
"""
from core.fields import ConfigError, Field, at_least, in_range, list_of

TASKS = ("classification", "detection")  # engine/tasks.py builds each
METRICS = {"classification": ("top1", "top5", "ema_top1"),  # what eval.best_metric may name, per task
           "detection": tuple(f"{p}{t}_{k}" for p in ("", "ema_") for t in ("bbox", "segm")
                              for k in ("AP", "AP50", "AP75"))}
SCHEDULES = ("step", "multistep", "cosine", "poly", "constant")
WD_EXEMPT = ("norm", "bias", "marked")


def _lr_mult(value, path):
    if value <= 0:
        raise ConfigError(f"{path}={value!r} must be > 0 (the backbone's LR is train.lr x this); to keep "
                          f"backbone weights fixed use model.frozen_stages instead")


def _subset_of(choices):
    def check(value, path):
        for x in value:
            if x not in choices:
                raise ConfigError(f"{path}: '{x}' is not one of {list(choices)}; remove or fix it")
    return check


TRAIN_SCHEMA = {
    "epochs": Field(100, "number of training epochs", check=at_least(1)),
    "batch_size": Field(256, "GLOBAL batch per optimizer step (all processes x accum_steps)",
                        check=at_least(1)),
    "accum_steps": Field(1, "gradient accumulation: micro-batches per optimizer step", check=at_least(1)),
    "optimizer": Field("sgd", "optimizer (SGD with momentum)", choices=("sgd",)),
    "lr": Field(0.1, "peak learning rate for train.batch_size (reached after warmup)",
                check=at_least(0.0, strict=True)),
    "backbone_lr_mult": Field(1.0, "fine-tuning: every parameter but the classifier's trains at train.lr x this "
                              "(e.g. 0.1; the schedule scales both alike); 1: one LR for all",
                              check=_lr_mult),
    "momentum": Field(0.9, "SGD momentum", check=in_range(0.0, 1.0)),
    "nesterov": Field(False, "use Nesterov momentum"),
    "weight_decay": Field(1e-4, "L2 weight decay (SGD's coupled form)", check=at_least(0.0)),
    "wd_exempt": Field([], "parameters without weight decay: 'norm' (norm layers), 'bias' (all biases), "
                       "'marked' (names listed by a module's no_weight_decay, e.g. CE's mixing theta)",
                       type=list, check=_subset_of(WD_EXEMPT)),
    "schedule": Field("step", "LR schedule, evaluated every iteration", choices=SCHEDULES),
    "step_size": Field(30, "step: decay by gamma every step_size epochs", check=at_least(1)),
    "milestones": Field([30, 60, 90], "multistep: epochs at which lr is multiplied by gamma",
                        type=list, check=list_of(int, 0, "milestone")),
    "gamma": Field(0.1, "step/multistep decay factor", check=at_least(0.0)),
    "power": Field(1.0, "poly: lr = min_lr + (lr - min_lr) * (1 - t/T)^power", check=at_least(0.0)),
    "min_lr": Field(0.0, "cosine/poly: final learning rate", check=at_least(0.0)),
    "warmup_epochs": Field(0.0, "linear warmup length in epochs (fractions allowed, per iteration)",
                           check=at_least(0.0)),
    "warmup_start_factor": Field(0.1, "warmup starts at lr * warmup_start_factor",
                                 check=in_range(0.0, 1.0)),
    "label_smoothing": Field(0.0, "cross-entropy label smoothing", check=in_range(0.0, 1.0)),
    "amp": Field("none", "mixed precision (autocast, on CUDA and CPU): none, bf16, or fp16 (with a dynamic grad scaler)",
                 choices=("none", "bf16", "fp16")),
    "channels_last": Field(False, "use channels_last memory format for the model and inputs"),
    "compile": Field(False, "wrap the model with torch.compile"),
    "compile_backend": Field("inductor", "torch.compile backend: inductor (generated kernels), aot_eager (traces "
                             "forward and backward, no code generation: starts in seconds; for debugging and CPU "
                             "tests) or eager (dynamo only)", choices=("inductor", "aot_eager", "eager")),
    "sync_bn": Field(False, "convert BatchNorm layers to SyncBatchNorm when training on several processes"),
    "clip_grad_norm": Field(None, "clip the global gradient norm to this value (null: off)",
                            type=(int, float), nullable=True, check=at_least(0.0, strict=True)),
    "max_nonfinite": Field(None, "null: stop (exit 3) when the logged loss is nan/inf (checked at log "
                           "intervals, no per-step sync); N: check every step (one device sync per step) and "
                           "skip up to N nan/inf updates in a row", type=int, nullable=True, check=at_least(0)),
    "ema": Field(False, "keep an exponential moving average of the weights (evaluated as ema_top1)"),
    "ema_decay": Field(0.9999, "EMA decay per update", check=in_range(0.0, 1.0)),
    "ema_every": Field(1, "update the EMA every N optimizer steps", check=at_least(1)),
}

EVAL_SCHEMA = {
    "interval": Field(1, "evaluate every N epochs during training (0: only after the last epoch)",
                      check=at_least(0)),
    "batch_size": Field(256, "GLOBAL evaluation batch (split over processes)", check=at_least(1)),
    "best_metric": Field("top1", "metric that selects best.pth (higher is better): top1, top5, ema_top1 "
                         "(classification); bbox_AP, segm_AP, bbox_AP50, ... and ema_ forms (detection)",
                         choices=tuple(m for ms in METRICS.values() for m in ms)),
    "final": Field(True, "evaluate after the last epoch even if interval does not divide epochs"),
}

RUNTIME_SCHEMA = {
    "work_dir": Field(None, "directory for checkpoints, logs, config and metrics (null: work_dirs/<config path "
                      "under configs/ without .yaml>, e.g. work_dirs/imagenet/cenet/resnet50)", type=str, nullable=True),
    "device": Field("auto", "auto (cuda when available), cuda or cpu", choices=("auto", "cuda", "cpu")),
    "threads": Field(None, "CPU threads per process (null: OMP_NUM_THREADS when set, else the cores this "
                     "process may use / processes on the node, 1 to 8; engine/threads.py)",
                     type=int, nullable=True, check=at_least(1)),
    "seed": Field(0, "base random seed (each rank adds its rank)", check=at_least(0)),
    "deterministic": Field(False, "use deterministic algorithms (slower; cudnn.benchmark off)"),
    "cudnn_benchmark": Field(True, "let cuDNN pick the fastest kernels (ignored when deterministic)"),
    "log_interval": Field(20, "print/log training metrics every N optimizer steps", check=at_least(1)),
    "tensorboard": Field(True, "write tensorboardX scalars to <work_dir>/tb"),
    "ckpt_interval": Field(1, "save a checkpoint every N epochs (the last epoch is always saved)",
                           check=at_least(1)),
    "ckpt_interval_steps": Field(0, "also save every N optimizer steps, mid-epoch (0: off)",
                                 check=at_least(0)),
    "keep_last": Field(3, "keep the last K checkpoints (best.pth is kept separately)", check=at_least(1)),
    "auto_resume": Field(True, "resume from the work directory's latest checkpoint when there is one"),
    "resume_mismatch": Field("refuse", "a work dir whose config.yaml trained another model/recipe: refuse, or "
                             "allow continuing it with the differing keys (logged)", choices=("refuse", "allow")),
    "resume_from": Field(None, "resume from this checkpoint path instead (full training state)",
                         type=str, nullable=True),
    "handle_signals": Field(True, "on SIGTERM/SIGUSR1/SIGINT save at the current step and exit with code 75"),
    "max_steps": Field(0, "stop after this many optimizer steps in total, without saving (0: no limit; "
                       "smoke tests and benchmarks)",
                       check=at_least(0)),
}

DIST_SCHEMA = {
    "backend": Field("auto", "process group backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo",
                     choices=("auto", "nccl", "gloo")),
    "timeout_min": Field(30, "collective timeout in minutes", check=at_least(1)),
    "watchdog_s": Field(300, "end the run (exit 76, naming it) when a rank or data worker makes no progress for this "
                        "many seconds; below timeout_min; the first step is not watched (0: off)",
                        check=at_least(0)),
    "rdzv_timeout_s": Field(300, "seconds to wait for every process (all nodes) to join before exiting 76",
                            check=at_least(1)),
    "find_unused_parameters": Field(False, "DDP find_unused_parameters (only for models that need it)"),
}

ENGINE_SCHEMA = {"train": TRAIN_SCHEMA, "eval": EVAL_SCHEMA, "runtime": RUNTIME_SCHEMA, "dist": DIST_SCHEMA}


def cross_check(tree):
    """Checks that involve more than one key (the tree is already type-checked)."""
    train, ev = tree["train"], tree["eval"]
    task = tree.get("task", "classification")
    if ev["best_metric"] not in METRICS[task]:
        raise ConfigError(f"eval.best_metric={ev['best_metric']} is not a {task} metric; use one of "
                          f"{list(METRICS[task])}")
    if ev["best_metric"].startswith("ema_") and not train["ema"]:
        raise ConfigError(f"eval.best_metric={ev['best_metric']} needs train.ema=true; enable the EMA or use "
                          f"{ev['best_metric'][4:]}")
    if task == "detection":
        _check_detection(tree)
    if train["schedule"] == "multistep" and list(train["milestones"]) != sorted(train["milestones"]):
        raise ConfigError(f"train.milestones={train['milestones']} must be increasing; sort them")
    if train["warmup_epochs"] > train["epochs"]:
        raise ConfigError(f"train.warmup_epochs={train['warmup_epochs']} exceeds train.epochs="
                          f"{train['epochs']}; shorten the warmup")
    dist = tree["dist"]
    if dist["watchdog_s"] >= dist["timeout_min"] * 60:
        raise ConfigError(f"dist.watchdog_s={dist['watchdog_s']} is not below dist.timeout_min={dist['timeout_min']} "
                          "minutes: a stall would end in a collective timeout's traceback; lower dist.watchdog_s")
    if train["batch_size"] % train["accum_steps"]:
        raise ConfigError(f"train.batch_size={train['batch_size']} is not divisible by "
                          f"train.accum_steps={train['accum_steps']}; change one of them")


def _check_detection(tree):
    from models.detector import check_detector
    if tree["data"]["dataset"] != "coco":
        raise ConfigError(f"task: detection reads COCO-format data; set data.dataset=coco (got "
                          f"{tree['data']['dataset']})")
    if tree["eval"]["best_metric"].endswith(("segm_AP", "segm_AP50", "segm_AP75")) and \
            tree["detector"]["type"] != "mask_rcnn":
        raise ConfigError(f"eval.best_metric={tree['eval']['best_metric']} needs masks: set "
                          f"detector.type=mask_rcnn or use bbox_AP")
    if tree["model"].get("features_only"):
        raise ConfigError("task: detection makes the body features-only itself (from detector.out_indices); "
                          "remove model.features_only and model.out_indices")
    check_detector(tree["detector"])


TASK_FIELD = Field("classification", "what the run trains: classification (model = classifier) or detection "
                   "(detector section over model's backbone, COCO-format data; docs/detection.md)", choices=TASKS)


def get_schema():
    """The full schema: model, detector and data sections from their packages, then the engine's."""
    from data.schema import DATA_SCHEMA
    from models.schema import DETECTOR_SCHEMA, MODEL_SCHEMA
    return {"task": TASK_FIELD, "model": MODEL_SCHEMA, "detector": DETECTOR_SCHEMA, "data": DATA_SCHEMA,
            **ENGINE_SCHEMA}


def describe(schema=None, prefix=""):
    """Rows ``(key, default, doc)`` for every field, depth first."""
    schema = get_schema() if schema is None else schema
    rows = []
    for k, spec in schema.items():
        if isinstance(spec, Field):
            choices = f" (one of {', '.join(map(str, spec.choices))})" if spec.choices else ""
            rows.append((f"{prefix}{k}", spec.default, spec.doc + choices))
        else:
            rows.extend(describe(spec, f"{prefix}{k}."))
    return rows


def main():
    print("| key | default | meaning |\n|---|---|---|")
    for key, default, doc in describe():
        print(f"| `{key}` | `{default!r}` | {doc.replace('|', '/')} |")


if __name__ == "__main__":
    main()
