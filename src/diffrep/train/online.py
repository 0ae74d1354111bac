"""Representation quality during training: val kNN of the EMA model's features, and best-step selection.

Every `train.eval_every` steps (and at the last step) the engine calls
`OnlineEval.after_step`: the EMA model's features of the train and val splits
(eval/features.py, pooled exactly as the linear_probe stage pools them) go
through the project's kNN (eval/probe.py `Probe.choose`, every setting from
the `probe` section; k is the best of `probe.knn_k` on val). The accuracy is
logged to TensorBoard (`online/val_knn`) and to `metrics/<stage>_online.tsv`
(`dvc plots`, beside the loss curve). Only val is read: test stays unread
until the stage reports its numbers.

`train.select: best` keeps a copy of the EMA weights of the step with the best
val kNN (ties: the earlier step); `finish` loads them into the EMA model the
stage saves, and `summary` says which step was chosen (metrics + lineage).

It never changes the training trajectory: it runs under a forked RNG, with
no gradients, on the EMA copy (always in eval mode), and its state (the rows,
the best step and its weights) travels inside the engine's checkpoint, so a
kill + resume gives the same rows, the same choice and the same weights.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from diffrep.config import TrainConfig
from diffrep.eval.probe import Probe
from diffrep.io import write_text

if TYPE_CHECKING:
    from diffrep.train.engine import Trainer

FeatureFactory = Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]]  # model -> (images -> (N, D))
COLUMNS = ("step", "val_knn", "knn_k", "eval_s")


def write_curve(path: Path, rows: list[list[float]]) -> None:
    """The `dvc plots` file: a header and one row per evaluation (just the header when the evaluation is off)."""
    lines = ["\t".join(COLUMNS)] + [f"{int(s)}\t{a:.6g}\t{int(k)}\t{t:.3f}" for s, a, k, t in rows]
    write_text(path, "\n".join(lines) + "\n")


class OnlineEval:
    def __init__(self, features: FeatureFactory, probe: Probe, train_x: torch.Tensor, val_x: torch.Tensor,
                 val_y: torch.Tensor, cfg: TrainConfig, *, curve_path: Path | None = None):
        if not cfg.eval_every:
            raise ValueError("OnlineEval needs train.eval_every > 0")
        if len(train_x) != len(probe.train_y):
            raise ValueError(f"OnlineEval: {len(train_x)} training images but {len(probe.train_y)} labels")
        self.features, self.probe, self.cfg = features, probe, cfg
        self.train_x, self.val_x, self.val_y = train_x, val_x, val_y
        self.curve_path = Path(curve_path) if curve_path else None
        self.rows: list[list[float]] = []  # [step, val_knn, k, seconds]
        self.best_step: int | None = None
        self.best_score = -1.0
        self.best_ema: dict[str, torch.Tensor] | None = None  # select: best only

    # ------------------------------------------------------------ called by the engine
    def due(self, step: int) -> bool:
        return step % self.cfg.eval_every == 0 or step == self.cfg.steps

    @torch.no_grad()
    def measure(self, model: nn.Module) -> tuple[dict, float]:
        """(Probe.choose on val without the linear probe, seconds) for the features of `model`."""
        t = time.perf_counter()
        dev = next(model.parameters()).device
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            fn = self.features(model)
            choice = self.probe.choose((fn(self.train_x), fn(self.val_x)), self.val_y, linear=False)
        return choice, time.perf_counter() - t

    def after_step(self, trainer: "Trainer", step: int) -> None:
        if not trainer.dist.is_main or not self.due(step) or (self.rows and self.rows[-1][0] >= step):
            return
        choice, secs = self.measure(trainer.ema)
        acc = float(choice["val_knn"])
        self.rows.append([step, acc, choice["knn_k"], secs])
        if acc > self.best_score:
            self.best_step, self.best_score = step, acc
            if self.cfg.select == "best":
                self.best_ema = {k: v.detach().clone() for k, v in trainer.ema.state_dict().items()}
        if trainer.writer is not None:
            trainer.writer.add_scalar("online/val_knn", acc, step)
            trainer.writer.add_scalar("online/eval_s", secs, step)
        self.write_curve()

    def state_dict(self) -> dict[str, Any]:  # plain values and tensors: part of the weights-only checkpoint
        return {"rows": self.rows, "best_step": self.best_step, "best_score": self.best_score,
                "best_ema": self.best_ema}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:  # a checkpoint written with the online evaluation off cannot carry this run's
            raise ValueError("the resume checkpoint has no online-evaluation state (written with train.eval_every "
                             "off); delete its folder under .cache/checkpoints/ to train this run from scratch")
        self.rows, self.best_step, self.best_score = state["rows"], state["best_step"], state["best_score"]
        self.best_ema = state["best_ema"]

    # ------------------------------------------------------------ called by the stage after fit
    def write_curve(self) -> None:
        if self.curve_path is not None:
            write_curve(self.curve_path, self.rows)

    def finish(self, ema: nn.Module) -> dict[str, Any]:
        """Load the selected weights into `ema` (select: best), write the curve; -> the summary."""
        if self.cfg.select == "best" and self.best_ema is not None:
            ema.load_state_dict(self.best_ema)
        self.write_curve()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """What was measured and chosen: for the stage's metrics and its lineage block."""
        if not self.rows:
            return {"select": self.cfg.select, "eval_every": self.cfg.eval_every, "evaluations": 0}
        last = self.rows[-1]
        chosen = self.best_step if self.cfg.select == "best" else int(last[0])
        score = self.best_score if self.cfg.select == "best" else last[1]
        return {"select": self.cfg.select, "eval_every": self.cfg.eval_every, "selected_step": chosen,
                "val_knn_selected": score, "val_knn_last": last[1], "val_knn_best": self.best_score,
                "best_step": self.best_step, "evaluations": len(self.rows),
                "online_eval_s": round(sum(r[3] for r in self.rows), 3)}
