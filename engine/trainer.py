"""The training loop: setup from a config, epochs of SGD steps, evaluation, checkpoints, resume.

``Trainer(cfg).train()`` builds everything first (data, model, optimizer) and
loads the checkpoint to resume from, so a refused config or checkpoint writes
nothing into the work directory. The hot path moves the uint8 batch with
``non_blocking`` copies, applies the data's device transform there, and never
syncs with the device except at log intervals. The state saved every
``runtime.ckpt_interval`` epochs (and every ``runtime.ckpt_interval_steps``
steps, and on SIGTERM/SIGUSR1) is enough to continue bit-for-bit: model,
optimizer, scheduler, scaler, EMA, epoch/step/iter_in_epoch, per-rank RNG states
(also those at the start of the epoch, which fix the data loader's seed) and
the config. The train sampler skips the batches already done in the epoch.
"""
import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn

from core.config import Config, dump
from core.exits import EXIT_PEER_LOST
from core.fields import ConfigError
from core.watchdog import RUN_DIR_ENV, Heartbeat
from data.loader import start_epoch
from engine import distributed as du
from engine.checkpoint import CheckpointError, state_nbytes
from engine.checkpoint_manager import CheckpointManager, check_writable
from engine.ema import ModelEMA
from engine.evaluator import autocast_for
from engine.guard import NonFiniteError, NonFiniteGuard
from engine.lock import WorkDirBusy, WorkDirLock
from engine.logger import RunLogger, setup_console
from engine.meters import Throughput, format_eta
from engine.optim import IterScheduler, build_optimizer, group_lrs
from engine.ownership import check_owner, describe_diff
from engine.preempt import StopAgreement
from engine.state import TrainerState, capture_rng_state, restore_rng_state, seed_everything
from engine.summary import run_summary
from engine.syncbn import convert_sync_batchnorm
from engine.threads import set_threads


class _ValidationStopped(Exception):
    """A stop signal arrived during validation (raised on every rank at the same batch)."""


class Trainer(TrainerState):
    def __init__(self, cfg, model_fn=None):
        """Build the run in named steps; nothing is written into the work directory until the last one."""
        from engine.tasks import build_task
        self.cfg = cfg if isinstance(cfg, Config) else Config(cfg)
        if self.cfg.runtime.work_dir is None:
            raise ConfigError("runtime.work_dir is not set; pass runtime.work_dir=DIR")
        self.task = build_task(self.cfg)
        self.work_dir = self.cfg.runtime.work_dir
        threads = self._setup_processes()
        self._build_data()
        self._build_model(model_fn or self.task.build_model)
        self._init_state()
        self._resume()
        self._claim_work_dir()
        self.runlog = RunLogger(self.work_dir, self.dist.is_main, self.cfg.runtime.tensorboard)
        for line in run_summary(self, threads):
            self.log.info("%s", line)
        self._log_pretrained()

    def _setup_processes(self):
        """Process group, console, threads, per-process batch and seeds; returns the thread count."""
        cfg, rt, tr = self.cfg, self.cfg.runtime, self.cfg.train
        self.dist = du.init_distributed(cfg.dist, rt.device)
        self.log = setup_console(self.dist.rank)
        threads = set_threads(rt.threads)
        self.device, world = self.dist.device, self.dist.world_size
        if tr.batch_size % (world * tr.accum_steps):
            raise ConfigError(f"train.batch_size={tr.batch_size} is not divisible by world_size x accum_steps = "
                              f"{world} x {tr.accum_steps}; change train.batch_size or the number of processes")
        self.batch = tr.batch_size // (world * tr.accum_steps)
        self.accum = tr.accum_steps
        self.amp = tr.amp
        seed_everything(rt.seed, rt.deterministic, rt.cudnn_benchmark)
        return threads

    def _build_data(self):
        """Datasets, loaders and the device-side transforms; the step counts of the schedule."""
        import data as data_lib
        cfg, rt, tr, task = self.cfg, self.cfg.runtime, self.cfg.train, self.task
        world = self.dist.world_size
        self.train_set, self.val_set = task.build_dataset("train"), task.build_dataset("val")
        dist_on = self.dist.distributed
        self.train_loader = data_lib.build_loader(self.train_set, cfg.data, "train", self.batch, dist_on, rt.seed)
        val_batch = max(cfg.eval.batch_size // world, 1)
        self.val_loader = data_lib.build_loader(self.val_set, cfg.data, "val", val_batch, dist_on, rt.seed)
        self.train_tf, self.val_tf = task.device_transform("train"), task.device_transform("val")
        for tf in (self.train_tf, self.val_tf):
            if isinstance(tf, nn.Module):
                tf.to(self.device)
        self.iters_per_epoch = len(self.train_loader) // self.accum
        if self.iters_per_epoch < 1:
            raise ConfigError(f"the training set ({len(self.train_set)} images) is smaller than one step of "
                              f"train.batch_size={tr.batch_size}; lower train.batch_size")
        self.total_steps = tr.epochs * self.iters_per_epoch

    def _build_model(self, model_fn):
        """Model (same initial weights on every rank and for every world size), optimizer, schedule, scaler, EMA,
        and the module the steps run (``self.net``: DDP and/or compiled around ``self.model``)."""
        cfg, rt, tr = self.cfg, self.cfg.runtime, self.cfg.train
        dist_on = self.dist.distributed
        torch.manual_seed(rt.seed)
        model = model_fn(cfg.model)
        if dist_on and tr.sync_bn:
            model = convert_sync_batchnorm(model, self.device.type)
        model.to(self.device)
        if tr.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        seed_everything(rt.seed + self.dist.rank, rt.deterministic, rt.cudnn_benchmark)
        self.optimizer = build_optimizer(model, tr)
        self.scheduler = IterScheduler(self.optimizer, tr, self.iters_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == "fp16" else None
        if self.amp != "none":
            self.log.info("mixed precision: %s autocast on %s%s", self.amp, self.device.type,
                          " with a dynamic grad scaler" if self.scaler is not None else "")
        self.ema = ModelEMA(model, tr.ema_decay, tr.ema_every) if tr.ema else None
        self.net = model
        if dist_on:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=ids, find_unused_parameters=cfg.dist.find_unused_parameters)
        if tr.compile:
            self.net = torch.compile(self.net, backend=tr.compile_backend)
            self.log.info("torch.compile, backend %s (the first steps include compilation)", tr.compile_backend)

    def _init_state(self):
        """Counters, the stop agreement, the checkpoint manager and the guards of a run that has not started."""
        rt, tr = self.cfg.runtime, self.cfg.train
        self.epoch = self.step = self.iter_in_epoch = 0
        self.watch = Heartbeat("", self.dist.rank, 0)  # train() starts a real one (core/watchdog.py)
        self._timed = (0.0, 0)  # training seconds and steps of this run, for the ETA
        self.best_metric = None
        self.rng_epoch_start = None
        self.stop = StopAgreement()
        self.ckpt = CheckpointManager(self.work_dir, keep_last=rt.keep_last, metric_name=self.cfg.eval.best_metric)
        self.nonfinite = None if tr.max_nonfinite is None else NonFiniteGuard(tr.max_nonfinite, self.ckpt)
        self.lock = WorkDirLock(self.work_dir)
        self.pretrained = None  # (path, models.weights.LoadReport) when model.pretrained initialised this run

    def _resume(self):
        """Check the work dir holds a run of this recipe, then load the checkpoint to continue from (if any)."""
        cfg, rt = self.cfg, self.cfg.runtime
        self._resumed_pointer = self.ckpt.read_pointer()
        changed = check_owner(self.work_dir, cfg.to_dict(), bool(self.ckpt.candidates()),
                              allow=rt.resume_mismatch == "allow")
        if changed:
            self.log.warning("runtime.resume_mismatch=allow: continuing %s with %s", self.work_dir,
                             describe_diff(changed, limit=len(changed)))
        self._resume_from_checkpoint()

    def _claim_work_dir(self):
        """Only now write into the work directory: rank 0 checks space, locks it and writes the config;
        the other ranks learn whether that worked."""
        cfg, rt = self.cfg, self.cfg.runtime
        err = None
        if self.dist.is_main:
            try:
                self._check_shared_memory()
                check_writable(self.work_dir, need_bytes=self._checkpoint_bytes() * 2,  # new file before old goes
                               files=("config.yaml", "log.txt", "metrics.jsonl", "checkpoints/latest",
                                      "checkpoints/best.pth", "checkpoints/best.json"),
                               dirs=("checkpoints",) + (("tb",) if rt.tensorboard else ()))
                self.lock.acquire()
                if self.ckpt.read_pointer() != self._resumed_pointer:
                    raise WorkDirBusy(f"work_dir {self.work_dir} got a new checkpoint while this run was starting "
                                      "(another run just stopped?); run the same command again to resume from it")
                dump(cfg, os.path.join(self.work_dir, "config.yaml"))
                setup_console(0, os.path.join(self.work_dir, "log.txt"))
                damaged = self.ckpt.check_best()
                if damaged:
                    self.log.warning("%s", damaged)
            except WorkDirBusy as e:
                err = ("busy", str(e))
            except (CheckpointError, OSError) as e:
                err = ("io", str(e))
            if err is not None:
                self.lock.release()
        err = self.stop.broadcast(err)
        if err is not None:
            raise (WorkDirBusy if err[0] == "busy" else CheckpointError)(err[1])

    SHM = "/dev/shm"

    def _check_shared_memory(self):
        """Data workers hand their batches to the process through /dev/shm: with less free there than the batches
        in flight (per-process batch x prefetch_factor x workers x processes on this node, x2 margin), a worker
        dies mid-epoch with a bus error or 'unable to write to file </torch_...>'. Refuse before the first step."""
        d = self.cfg.data
        if not d.workers or not os.path.isdir(self.SHM):
            return
        from data.recipe import build_recipe
        side = build_recipe(d.to_dict() if hasattr(d, "to_dict") else d).input_size
        image = 3 * side * side  # uint8 images, int64 labels
        batch = max(self.train_loader.batch_size or self.batch, self.val_loader.batch_size or 1)
        procs = int(os.environ.get("LOCAL_WORLD_SIZE") or self.dist.world_size)
        need = 2 * (batch * (image + 8)) * d.prefetch_factor * d.workers * procs
        free = shutil.disk_usage(self.SHM).free
        if free < need:
            from engine.checkpoint_manager import _size
            raise CheckpointError(
                f"{self.SHM} has {_size(free)} free but the data workers' batches in flight need about {_size(need)} "
                f"({procs} process{'es' if procs > 1 else ''} x data.workers={d.workers} x "
                f"data.prefetch_factor={d.prefetch_factor} x batches of {batch} x 3x{side}x{side} uint8, x2 margin); "
                f"lower data.workers (0 needs no shared memory), data.prefetch_factor or "
                f"train.batch_size/eval.batch_size, or give the container more shared memory "
                f"(docker run --shm-size=8g or --ipc=host)")

    def _checkpoint_bytes(self):
        """About the size of a checkpoint, before the first step (the optimizer's state is still empty):
        the weights, SGD's momentum buffer of each, the EMA's copy."""
        return state_nbytes(self.model.state_dict()) * (2 + (self.ema is not None))

    def _log_pretrained(self):
        """Say what model.pretrained loaded and exactly which keys it skipped and why (log and metrics.jsonl)."""
        if self.pretrained is None:
            return
        path, report = self.pretrained
        self.log.info("initialised weights from %s (%s format): %s", path, report.source, report.summary())
        self.runlog.log("pretrained", 0, {}, path=path, source=report.source, loaded=report.loaded,
                        skipped=report.skipped, reasons=report.skipped_reasons())

    def save(self, tag, metric=None):
        """Save the full state (all ranks call this; rank 0 writes)."""
        self.watch.beat(phase="save")
        state = self.state_dict()
        err, path = None, None
        if self.dist.is_main:
            try:
                path = self.ckpt.save(state, tag, metric=metric)
            except CheckpointError as e:
                err = str(e)
        err, path = self.stop.broadcast((err, path))
        self.watch.beat(phase="data")
        if err is not None:
            raise CheckpointError(err)
        self.log.info("saved checkpoint %s", path)
        return path

    # ------------------------------------------------------------------ loop
    def train(self):
        """Run to ``train.epochs``; returns {'status': 'done'|'preempted'|'max_steps', 'metrics', ...}."""
        tr, rt = self.cfg.train, self.cfg.runtime
        status, metrics = "done", None
        if rt.handle_signals:
            self.stop.guard.install()
        own_dir = self._start_watchdog()
        try:
            while self.epoch < tr.epochs:
                status = self._train_epoch(self.epoch)
                if status == "preempted":
                    self.save(f"step_{self.step}")
                if status != "done":
                    break
                self.epoch += 1
                self.iter_in_epoch = 0
                last = self.epoch == tr.epochs
                if (self.cfg.eval.interval and self.epoch % self.cfg.eval.interval == 0) or \
                        (last and self.cfg.eval.final):
                    metrics = self.validate()
                    if metrics is None:  # a stop signal: save the trained epoch, validate it on resume
                        self.epoch, self.iter_in_epoch = self.epoch - 1, self.iters_per_epoch
                        self.save(f"step_{self.step}")
                        status = "preempted"
                        break
                saved = self.epoch % rt.ckpt_interval == 0 or last
                if saved:
                    metric = metrics.get(self.cfg.eval.best_metric) if metrics else None
                    if metric is not None and (self.best_metric is None or metric > self.best_metric):
                        self.best_metric = metric
                    self.save(f"epoch_{self.epoch}", metric)
                if not last and self.stop.poll(sync=True):
                    if not saved:
                        self.save(f"epoch_{self.epoch}")
                    status = "preempted"
                    break
        finally:
            self.watch.stop()
            if own_dir:
                shutil.rmtree(own_dir, ignore_errors=True)
            self.stop.close()
            self.runlog.close()
            self.lock.release()
        self._summary(status, metrics)
        return {"status": status, "metrics": metrics, "best_metric": self.best_metric,
                "epoch": self.epoch, "step": self.step, "checkpoint": self.ckpt.last_saved}

    def _start_watchdog(self):
        """Start the heartbeat (core/watchdog.py); alone (no tools/launch.py), this process also observes it.

        Returns the run directory it created (to remove at the end), or None."""
        run_dir, own = os.environ.get(RUN_DIR_ENV), None
        if not run_dir:
            run_dir = own = os.environ[RUN_DIR_ENV] = tempfile.mkdtemp(prefix="blocklab-run-")
        self.watch = Heartbeat(run_dir, self.dist.rank, self.cfg.dist.watchdog_s, observe=own is not None,
                               on_stall=self._stalled)
        self.watch.step = self.step
        self.watch.start()
        return own

    def _stalled(self, message):
        """Called by the watchdog thread of a process that runs without tools/launch.py: nothing can be saved."""
        if self.dist.is_main:
            print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)

    def _start_epoch(self, epoch):
        start_epoch(self.train_loader, epoch, self.iter_in_epoch * self.accum)
        if self.iter_in_epoch and self.rng_epoch_start is not None:
            now = capture_rng_state()
            restore_rng_state(self.rng_epoch_start)
            it = iter(self.train_loader)
            restore_rng_state(now)
        else:
            self.rng_epoch_start = capture_rng_state()
            it = iter(self.train_loader)
        return it

    def _train_epoch(self, epoch):
        self.net.train()
        meter, timer = self.task.meter(self.device), Throughput()
        it, micro = self._start_epoch(epoch), 0
        images_per_step = self.batch * self.accum * self.dist.world_size
        if self.iter_in_epoch >= self.iters_per_epoch:
            return "done"
        for images, target in it:
            self.watch.beat(phase="step")
            timer.data_ready()
            images = images.to(self.device, non_blocking=True)
            target = target.to(self.device, non_blocking=True)
            images = self.train_tf(images)
            micro += 1
            last_micro = micro == self.accum
            sync = contextlib.nullcontext() if last_micro or not self.dist.distributed else self.net.no_sync()
            with sync:
                with autocast_for(self.device, self.amp):
                    loss, logits = self.task.loss(self.net, images, target)
                if self.nonfinite is not None and not self.nonfinite.step_ok(loss, self.step):
                    self.optimizer.zero_grad(set_to_none=True)
                    micro = 0
                    continue
                scaled = loss / self.accum if self.accum > 1 else loss
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            meter.add(loss, logits, target)
            if not last_micro:
                continue
            micro = 0
            self.optimizer_step()
            self.step += 1
            self.iter_in_epoch += 1
            self.watch.beat(self.step, "data")
            timer.step_done(images_per_step)
            done = self.iter_in_epoch >= self.iters_per_epoch
            limit = self.cfg.runtime.max_steps and self.step >= self.cfg.runtime.max_steps
            if self.step % self.cfg.runtime.log_interval == 0 or done or limit:
                self._log_train(epoch, meter, timer)
            if limit:
                return "max_steps"
            if self.stop.poll():
                return "preempted"
            every = self.cfg.runtime.ckpt_interval_steps
            if every and self.step % every == 0 and not done:
                self.save(f"step_{self.step}")
            if done:
                break
        return "done"

    def optimizer_step(self):
        clip = self.cfg.train.clip_grad_norm
        if self.scaler is not None:
            if clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, self.step + 1)

    def _log_train(self, epoch, meter, timer):
        du.all_reduce_sum(meter.sums)
        m, t = meter.read(), timer.read()
        meter.reset()
        self._timed = (self._timed[0] + t.pop("elapsed"), self._timed[1] + t.pop("steps"))
        if not np.isfinite(m["loss"]):
            raise NonFiniteError(f"training loss is {m['loss']} at step {self.step}; last good checkpoint: "
                                 f"{self.ckpt.last_good() or 'none saved yet'}; lower "
                                 f"train.lr, set train.clip_grad_norm or train.amp=none, then resume")
        lr = self.optimizer.param_groups[0]["lr"]
        lrs = {"lr": lr, **{f"lr_{k}": v for k, v in group_lrs(self.optimizer).items()}}
        backbone = f" (backbone {lrs['lr_backbone']:.5g})" if "lr_backbone" in lrs else ""
        eta = format_eta((self.total_steps - self.step) * self._timed[0] / max(self._timed[1], 1))
        self.log.info(f"epoch {epoch + 1}/{self.cfg.train.epochs} [{self.iter_in_epoch}/{self.iters_per_epoch}] "
                      f"{self.task.train_line(m)} lr {lr:.5g}{backbone} | "
                      f"data {t['data_time']:.3f}s step {t['step_time']:.3f}s {t['img_s']:.0f} img/s | eta {eta}")
        self.runlog.log("train", self.step, {**m, **lrs, **t}, epoch=epoch + 1)

    def _val_batch_done(self, index):
        """After each validation batch: tell the watchdog; stop (all ranks at the same batch) on a signal."""
        self.watch.beat(phase="val")
        if index < self._val_polls and self.stop.poll():
            raise _ValidationStopped

    def validate(self):
        """The validation metrics (also logged and recorded), or None when a stop signal interrupted it."""
        start = time.perf_counter()
        self.watch.beat(phase="val")
        du.broadcast_buffers(self.model)
        if self.ema is not None:
            du.broadcast_buffers(self.ema.module)
        shard = len(self.val_set) // self.dist.world_size  # every rank has at least this many images
        self._val_polls = -(-shard // self.val_loader.batch_size)
        ev = dict(device=self.device, transform=self.val_tf, amp=self.amp, on_batch=self._val_batch_done)
        try:
            metrics = self.task.evaluate(self.model, self.val_loader, **ev)
            if self.ema is not None:
                metrics.update({f"ema_{k}": v for k, v in self.task.evaluate(self.ema.module, self.val_loader, **ev)
                                .items() if k not in ("count", "table")})
        except _ValidationStopped:
            self.log.warning("validation of epoch %d interrupted by %s: it runs again when the run resumes",
                             self.epoch, self.stop.signame or "a stop request")
            return None
        finally:
            self.watch.beat(phase="data")
        metrics["time_s"] = time.perf_counter() - start
        bad = [k for k in ("loss", "ema_loss") if k in metrics and not np.isfinite(metrics[k])]
        if bad:  # e.g. diverged running statistics: such weights must not become a checkpoint or best.pth
            raise NonFiniteError(f"validation {bad[0].replace('_', ' ')} is {metrics[bad[0]]} after epoch "
                                 f"{self.epoch} (this epoch is not saved); last good checkpoint: "
                                 f"{self.ckpt.last_good() or 'none saved yet'}; check "
                                 f"the block options and train.lr, then resume from it")
        if metrics["count"] != len(self.val_set):
            self.log.warning("evaluated %d images but the validation set has %d", metrics["count"], len(self.val_set))
        ema = f" | ema {self.task.val_line({k[4:]: v for k, v in metrics.items() if k.startswith('ema_')})}" \
            if self.ema is not None else ""
        if "table" in metrics:
            self.log.info("%s", metrics.pop("table"))
        self.log.info(f"val epoch {self.epoch}/{self.cfg.train.epochs}: {self.task.val_line(metrics)} "
                      f"({metrics['count']} images, {metrics['time_s']:.1f}s){ema}")
        self.runlog.log("val", self.step, metrics, epoch=self.epoch)
        if self.dist.is_main:
            try:
                self.ckpt.record_best_of(metrics, self.task.best_keys)
            except CheckpointError as e:
                self.log.warning("%s", e)
        return metrics

    def where(self):
        """The run's position in the words every message uses: epochs count from 1, as in the step lines."""
        epochs = self.cfg.train.epochs
        if self.iter_in_epoch == 0:
            return f"after epoch {self.epoch}/{epochs} (step {self.step})" if self.epoch else "at the start"
        return (f"in epoch {self.epoch + 1}/{epochs} at iteration {self.iter_in_epoch}/{self.iters_per_epoch} "
                f"(step {self.step})")

    def _summary(self, status, metrics):
        if not self.dist.is_main:
            return
        if status == "preempted":
            self.log.info("stopped by %s %s; checkpoint %s; run the same command to continue",
                          self.stop.signame or "request", self.where(), self.ckpt.last_saved)
            return
        if status == "max_steps":
            last = self.ckpt.last_saved or self.ckpt.latest()
            self.log.info("stopped at runtime.max_steps=%d %s; these steps are not saved (max_steps never saves); "
                          "%s", self.cfg.runtime.max_steps, self.where(),
                          f"last checkpoint: {last}" if last else "no checkpoint written")
            return
        if status == "done" and metrics is None and self.epoch >= self.cfg.train.epochs:
            self.log.info("nothing to do: this run already finished its %d epochs", self.epoch)
        if metrics:
            self.log.info("final: %s (best %s %.4g)", self.task.val_line(metrics), self.cfg.eval.best_metric,
                          self.best_metric if self.best_metric is not None else float("nan"))
        self.log.info("checkpoint: %s", self.ckpt.last_saved or self.ckpt.latest())
        if self.ckpt.best_path:
            self.log.info("best checkpoint: %s", self.ckpt.best_path)
        if self.cfg.runtime.tensorboard:
            view = "" if importlib.util.find_spec("tensorboard") else "pip install tensorboard && "
            self.log.info("tensorboard logs: %s  (%stensorboard --logdir %s)", self.runlog.tb_dir, view,
                          self.runlog.tb_dir)
        self.log.info("metrics: %s", os.path.join(self.work_dir, "metrics.jsonl"))
