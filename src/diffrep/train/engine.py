"""The training engine every diffrep model uses.

Model protocol
    A model is an `nn.Module` whose `forward(batch, rng) -> (loss, terms)`
    computes its own training loss, so DDP's forward/backward hooks see the
    whole step:
      batch  dict[str, Tensor]: this rank's rows of the global batch (one micro-batch of
             them with train.micro_batch), on the run's device (4-D floats channels_last if asked);
      rng    BatchRNG (diffrep.train.rng): ALL per-sample randomness (noise,
             timesteps, views, masks, condition dropout) must come from it;
      loss   scalar tensor, the mean over this rank's rows (DDP averages the
             gradients over ranks, giving the gradient of the global mean);
      terms  dict[str, scalar tensor] to log; same keys every step.

Determinism
    Data order is a permutation per epoch seeded by (seed, epoch) and noise a
    BatchRNG seeded by (seed, step), both drawn for the global batch, so
    neither depends on the world size or on a restart. The checkpoint holds
    model, EMA, optimizer, scheduler, torch RNG state (for dropout-like use of
    the global generator) and the log history; on CPU a kill + re-run ends
    with bit-identical weights to an uninterrupted run (tests/test_engine.py).
    Damaged checkpoints are refused by name (checkpoint.py); SIGTERM/SIGINT checkpoint, then exit 128 + signum.
    Sampling for TensorBoard runs under a forked, fixed-seed RNG so it never
    perturbs training; the optional `online` evaluator (train/online.py) runs the same way, after a step and
    before its checkpoint, and its state is part of the checkpoint. (Exactness assumes the same torch build, threads.)
    DDP: only rank 0 writes (checkpoint, TSV, TensorBoard, progress bar).

Schedule and EMA
    AdamW (no weight decay on 1-D params: biases, norm scales); the LR warms up
    linearly over warmup_steps then follows a cosine to lr * min_lr_ratio at
    step `steps`. A time budget (checked once per step, from the start of
    fit) stops early without rescaling this schedule; the final checkpoint is
    still written, so a re-run continues the remaining steps: stage code that
    wants one-shot behaviour removes ckpt_dir after saving its outputs.
    EMA decay is min(ema_decay, (1 + n) / (10 + n)) after n updates, so short
    CPU runs are not dominated by the random init.

Steps are counted as updates done: "step 8" is the state after 8 updates;
BatchRNG.step is the 0-based index of the update being computed.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from diffrep.config import TrainConfig
from diffrep.interrupt import deferred_signals, exit_code
from diffrep.io import write_text
from diffrep.runtime import Runtime
from diffrep.train.batches import check_data, gather
from diffrep.train.checkpoint import CKPT_NAME, load_latest, rng_state, save_checkpoint, set_rng_state
from diffrep.train.distributed import all_reduce_sum_, barrier, dist_info
from diffrep.train.rng import BatchRNG, derive_seed

log = logging.getLogger("diffrep.train")
RESERVED = ("step", "loss", "lr", "grad_norm")


class NonFiniteLossError(RuntimeError):
    """The loss or a logged term became NaN/Inf; training stopped before the update."""


@dataclass
class TrainResult:
    model: nn.Module  # unwrapped (no DDP/compile), trained weights, eval mode
    ema: nn.Module  # EMA copy, eval mode
    final_loss: float  # mean loss of the last (up to) 50 steps
    last_terms: dict[str, float]  # last step's terms, grad_norm included
    steps_done: int
    images_per_s: float  # global images per second of training steps only, over all resumed segments
    wall_s: float  # this process's fit() time
    stopped_early: bool  # time budget reached before train.steps
    resumed_from_step: int | None
    resumed_from: str | None = None  # the checkpoint file resumed from
    refused_checkpoints: list[str] = field(default_factory=list)  # why each unusable checkpoint was refused


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """LR multiplier for update `step` (0-based): (step+1)/warmup, then cosine 1 -> min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay_at(updates: int, decay: float) -> float:
    return min(decay, (1 + updates) / (10 + updates))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    for e, m in zip(ema.buffers(), model.buffers()):
        e.copy_(m)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (all have requires_grad=False)")
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class Trainer:
    def __init__(self, model: nn.Module, train_cfg: TrainConfig, runtime: Runtime, data: dict, *,
                 seed: int, ckpt_dir: Path, fingerprint: str, run_name: str = "train", log_dir: Path | None = None,
                 loss_curve_path: Path | None = None, sample_fn: Callable[[nn.Module], torch.Tensor] | None = None,
                 progress: bool = True, online=None):
        self.online = online  # a train/online.py OnlineEval: val kNN every train.eval_every steps, best-step choice
        self.cfg, self.rt, self.seed, self.fingerprint = train_cfg, runtime, int(seed), fingerprint
        self.run_name, self.sample_fn, self.progress = run_name, sample_fn, progress
        self.log_dir, self.writer, self.pbar = log_dir, None, None
        self.loss_curve_path = Path(loss_curve_path) if loss_curve_path else None
        self.ckpt_path = Path(ckpt_dir) / CKPT_NAME
        self.dist = dist_info()
        if train_cfg.batch_size % self.dist.world_size:
            raise ValueError(f"train.batch_size={train_cfg.batch_size} is not divisible by the number of DDP processes "
                             f"(WORLD_SIZE={self.dist.world_size}); choose a multiple of {self.dist.world_size}")
        self.local_batch = train_cfg.batch_size // self.dist.world_size
        self.micro = min(train_cfg.micro_batch or self.local_batch, self.local_batch)  # rows per forward/backward
        if self.local_batch % self.micro:
            raise ValueError(f"train.micro_batch={train_cfg.micro_batch} does not divide the per-process batch {self.local_batch}"
                             f" (batch_size {train_cfg.batch_size} / {self.dist.world_size} processes): use a divisor, or 0")
        self.data, self.n_items = data, check_data(data, train_cfg.batch_size)
        self.batches_per_epoch = self.n_items // train_cfg.batch_size  # the last partial batch is dropped
        self._perm_epoch, self._perm = -1, None

        dev = runtime.device
        model = model.to(dev)
        if runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        net: nn.Module = model
        self._ddp: DistributedDataParallel | None = None
        if self.dist.world_size > 1:  # DDP broadcasts rank 0's weights; the EMA starts from them too
            net = self._ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
            self.ema.load_state_dict(model.state_dict())
        self.net = torch.compile(net) if runtime.compile else net  # self.model stays the one we save
        self.params = [p for p in model.parameters() if p.requires_grad]
        impl = {"fused": True} if dev.type == "cuda" else {"foreach": True}  # both bit-deterministic for a fixed setup
        self.opt = torch.optim.AdamW(param_groups(model, train_cfg.weight_decay), lr=train_cfg.lr,
                                     betas=tuple(train_cfg.betas), **impl)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, train_cfg))
        # log history: restored on resume so the curve, final_loss and img/s span every segment
        self.term_names: list[str] | None = None
        self.rows: list[list[float]] = []  # [step, loss, lr, *terms, grad_norm], window means
        self.recent: deque[float] = deque(maxlen=50)
        self.window, self.last = [], []  # running sums; last step's [loss, *terms, grad_norm]
        self.window_n, self.images, self.train_s, self.ckpt_step, self._win_s = 0, 0, 0.0, 0, 0.0
        # resume record; SIGTERM/SIGINT seen by this process during fit / by any rank (all-reduced each step)
        self.resumed_from, self.refused, self._pending, self._interrupted = None, [], [], False

    # ------------------------------------------------------------------ data and one step
    def _indices(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.batches_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(derive_seed("data", self.seed, epoch))
            self._perm, self._perm_epoch = torch.randperm(self.n_items, generator=g), epoch
        start = pos * self.cfg.batch_size + self.dist.rank * self.local_batch
        return self._perm[start : start + self.local_batch]  # (local_B,)

    def _batch(self, step: int, micro: int = 0) -> tuple[dict[str, torch.Tensor], BatchRNG]:
        """Micro-batch `micro` of this rank's rows of update `step`, and its slice of the global BatchRNG."""
        lo = micro * self.micro  # rows [lo, lo + micro) of this rank's local batch
        idx, dev = self._indices(step)[lo : lo + self.micro], self.rt.device
        batch = {k: gather(v, idx).to(dev, non_blocking=True) for k, v in self.data.items()}
        if self.rt.channels_last:
            batch = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 and v.is_floating_point() else v
                     for k, v in batch.items()}
        rng = BatchRNG(self.seed, step, self.cfg.batch_size, self.dist.rank * self.local_batch + lo, self.micro, dev)
        return batch, rng

    def _grad_norm(self) -> torch.Tensor:
        if self.cfg.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        norms = [p.grad.detach().norm(2) for p in self.params if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=self.rt.device)

    def _forward(self, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        batch, rng = self._batch(step, micro)
        with self.rt.autocast():
            loss, terms = self.net(batch, rng)
        if not (isinstance(loss, torch.Tensor) and loss.ndim == 0 and isinstance(terms, dict)):
            got = f"({type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}, {type(terms).__name__})"
            raise TypeError(f"{type(self.model).__name__}.forward(batch, rng) must return "
                            f"(scalar loss tensor, dict of scalar tensors); got {got}")
        names = list(terms)
        if self.term_names is None:  # first step: validate once, not every step
            if bad := [k for k in names if k in RESERVED or torch.as_tensor(terms[k]).numel() != 1]:
                raise ValueError(f"{type(self.model).__name__}: terms {bad} are reserved names ({', '.join(RESERVED)}) "
                                 "or not scalars; rename them / reduce them to one number")
            self.term_names = names
        elif names != self.term_names:
            raise ValueError(f"{type(self.model).__name__}: terms changed from {self.term_names} to {names} "
                             f"at step {step + 1}; return the same keys every step")
        return loss, terms

    def train_step(self, step: int, over_budget: bool = False) -> tuple[list[float], float, bool]:
        """One update (also what bench/ times). Returns (global-mean [loss, *terms, grad_norm], lr, any rank over budget).
        Gradient accumulation: n equal micro-batches, each loss / n into the same .grad; DDP syncs on the last only."""
        n_micro, acc = self.local_batch // self.micro, None
        for m in range(n_micro):
            sync = m == n_micro - 1 or self._ddp is None
            with contextlib.nullcontext() if sync else self._ddp.no_sync():
                loss, terms = self._forward(step, m)
                (loss / n_micro if n_micro > 1 else loss).backward()
            dev = loss.device
            vals = torch.stack([loss.detach().float(), *(torch.as_tensor(t, device=dev).detach().float().reshape(())
                                                       for t in terms.values())]) / n_micro  # (1 + n_terms,)
            acc = vals if acc is None else acc + vals
        grad_norm = self._grad_norm()
        vec = torch.cat([acc, torch.stack([grad_norm.detach().float().to(dev), torch.tensor(float(over_budget), device=dev),
                                           torch.tensor(float(bool(self._pending)), device=dev)])])
        vals = all_reduce_sum_(vec).tolist()  # one sync per step; every rank then takes the same decisions
        stats, stop, self._interrupted = [v / self.dist.world_size for v in vals[:-2]], vals[-2] > 0, vals[-1] > 0
        if not all(math.isfinite(v) for v in stats):
            self.opt.zero_grad(set_to_none=True)
            shown = ", ".join(f"{k}={v:.6g}" for k, v in zip(["loss", *self.term_names, "grad_norm"], stats))
            kept = (f"the last good checkpoint {self.ckpt_path} (step {self.ckpt_step}) was kept"
                    if self.ckpt_step else f"no checkpoint had been written yet ({self.ckpt_path})")
            raise NonFiniteLossError(
                f"{self.run_name}: non-finite loss at step {step + 1} of {self.cfg.steps}: {shown}. Nothing was written "
                f"for this step; {kept}. Lower train.lr or raise train.warmup_steps / lower train.grad_clip, "
                "then re-run (it resumes from that checkpoint unless the params changed).")
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        update_ema(self.ema, self.model, ema_decay_at(step + 1, self.cfg.ema_decay))
        return stats, lr, stop

    # ------------------------------------------------------------------ logging, checkpoints, samples
    def _record(self, step: int, stats: list[float], lr: float, dt: float) -> None:
        self.recent.append(stats[0])
        self.last = stats
        self.window = [a + b for a, b in zip(self.window, stats)] if self.window_n else list(stats)
        self.window_n += 1
        self.images += self.cfg.batch_size
        self.train_s += dt
        self._win_s += dt
        if step % self.cfg.log_every:
            return
        mean = [v / self.window_n for v in self.window]
        self.rows.append([step, mean[0], lr, *mean[1:]])
        ips = self.cfg.batch_size * self.window_n / max(self._win_s, 1e-9)
        self.window_n, self._win_s = 0, 0.0
        if self.writer is not None:
            for name, v in zip(["loss", *self.term_names, "grad_norm"], mean):
                self.writer.add_scalar(f"train/{name}", v, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/img_per_s", ips, step)
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{mean[0]:.4g}", img_s=f"{ips:.0f}", refresh=False)  # tqdm adds the ETA

    def _write_curve(self) -> None:
        if self.loss_curve_path is None or not self.dist.is_main:
            return
        lines = ["\t".join(["step", "loss", "lr", *(self.term_names or []), "grad_norm"])]
        lines += ["\t".join([str(int(r[0]))] + [f"{v:.7g}" for v in r[1:]]) for r in self.rows]
        write_text(self.loss_curve_path, "\n".join(lines) + "\n")

    def _save(self, step: int) -> None:
        if self.dist.is_main:
            epoch, pos = divmod(step, self.batches_per_epoch)
            save_checkpoint(self.ckpt_path, {
                "fingerprint": self.fingerprint, "run_name": self.run_name, "step": step,
                "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "rng": rng_state(),
                "data_order": {"epoch": epoch, "position": pos * self.cfg.batch_size, "n_items": self.n_items,
                               "batch_size": self.cfg.batch_size},
                "log": {"term_names": self.term_names, "rows": self.rows, "recent": list(self.recent), "last": self.last,
                        "window": self.window, "window_n": self.window_n, "images": self.images,
                        "train_s": self.train_s},
                "train_config": json.dumps(self.cfg.model_dump(mode="json"), sort_keys=True),
                "world_size": self.dist.world_size,
                "online": self.online.state_dict() if self.online is not None else None})
            self._write_curve()
        barrier()  # no rank runs ahead of a checkpoint it might need to resume from
        self.ckpt_step = step

    def _say(self, text: str) -> None:  # console (rank 0) and log: what happened to the checkpoints
        log.info("%s: %s", self.run_name, text)
        if self.dist.is_main:
            print(f"[{self.run_name}] {text}", file=sys.stderr, flush=True)

    def _resume(self) -> int | None:
        ck, path, self.refused = load_latest(self.ckpt_path.parent, self.fingerprint, self.n_items, self.cfg.batch_size)
        for reason in self.refused:
            self._say(f"refused checkpoint {reason}")
        if ck is None and self.refused:
            self._say(f"no usable checkpoint left: training from step 0 of {self.cfg.steps}")
        if ck is None:
            return None
        self.model.load_state_dict(ck["model"])
        self.ema.load_state_dict(ck["ema"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        lg = ck["log"]
        self.term_names, self.rows, self.window, self.window_n = lg["term_names"], lg["rows"], lg["window"], lg["window_n"]
        self.recent.extend(lg["recent"])
        self.last, self.images, self.train_s, self.ckpt_step = lg["last"], lg["images"], lg["train_s"], ck["step"]
        if self.online is not None:
            self.online.load_state_dict(ck.get("online"))
        self.resumed_from = str(path)
        self._say(f"resumed from step {ck['step']} of {self.cfg.steps} (checkpoint {path})")
        return ck["step"]

    def _stop_on_signal(self, step: int) -> None:  # SIGTERM/SIGINT reached some rank: checkpoint, then exit
        if step != self.ckpt_step:
            self._save(step)
        signum = self._pending[0] if self._pending else signal.SIGTERM  # another rank got it
        self._pending.clear()  # handled here: deferred_signals must not exit a second time
        self._say(f"stopped by {signal.Signals(signum).name} after step {step} of {self.cfg.steps}; checkpoint "
                  f"{self.ckpt_path} written: re-run to resume from step {step}")
        raise SystemExit(exit_code(signum))

    def _sample(self, step: int) -> None:
        if self.sample_fn is None or self.writer is None:
            return
        from torchvision.utils import make_grid  # lazily: torchvision import is slow

        cuda = [self.rt.device] if self.rt.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), self.rt.autocast():
            torch.manual_seed(derive_seed("sample", self.seed))  # same noise every time: grids are comparable
            imgs = self.sample_fn(self.ema)  # (B, C, H, W) in [-1, 1]
        imgs = imgs.detach().float().cpu().clamp(-1, 1).add(1).div(2)
        self.writer.add_image("samples", make_grid(imgs, nrow=max(1, math.ceil(math.sqrt(len(imgs))))), step)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        with deferred_signals() as self._pending:
            return self._fit()

    def _fit(self) -> TrainResult:
        t0 = time.perf_counter()
        resumed = self._resume()
        start = step = resumed or 0
        main = self.dist.is_main
        if main and self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # lazily: pulls in tensorboard

            self.writer = SummaryWriter(str(self.log_dir), purge_step=start or None)  # hide events past a resume point
        if main and self.progress:
            from tqdm import tqdm

            self.pbar = tqdm(total=self.cfg.steps, initial=start, desc=self.run_name, unit="step", dynamic_ncols=True)
        stopped = False
        self.model.train()
        try:
            while step < self.cfg.steps:
                t = time.perf_counter()
                over = self.cfg.time_budget_s > 0 and t - t0 >= self.cfg.time_budget_s
                stats, lr, any_over = self.train_step(step, over)
                step += 1
                self._record(step, stats, lr, time.perf_counter() - t)
                if self.online is not None:  # before any checkpoint of this step, so the checkpoint holds it
                    self.online.after_step(self, step)
                if self._interrupted:
                    self._stop_on_signal(step)
                if self.pbar is not None:
                    self.pbar.update(1)
                if step % self.cfg.ckpt_every == 0:
                    self._save(step)
                if main and self.cfg.sample_every and step % self.cfg.sample_every == 0:
                    self._sample(step)
                if any_over and step < self.cfg.steps:
                    stopped = True
                    break
            if step != self.ckpt_step:
                self._save(step)
            self._write_curve()  # also after resuming a finished run: DVC removes outputs before a re-run
            if main and step > start and not (self.cfg.sample_every and step % self.cfg.sample_every == 0):
                self._sample(step)
        finally:
            if self.writer is not None:
                self.writer.close()
            if self.pbar is not None:
                self.pbar.close()
        return self._result(step, t0, stopped, resumed)

    def _result(self, step: int, t0: float, stopped: bool, resumed: int | None) -> TrainResult:
        last = dict(zip([*(self.term_names or []), "grad_norm"], self.last[1:]))
        return TrainResult(
            model=self.model.eval(), ema=self.ema, final_loss=sum(self.recent) / max(1, len(self.recent)),
            last_terms=last, steps_done=step, images_per_s=self.images / self.train_s if self.train_s else 0.0,
            wall_s=time.perf_counter() - t0, stopped_early=stopped, resumed_from_step=resumed,
            resumed_from=self.resumed_from, refused_checkpoints=list(self.refused))
