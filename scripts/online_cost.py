"""What the online val kNN costs at each stage's default train.eval_every, measured interleaved in one process.

For soda, ul_stage1 and ldae with the params.yaml settings on the prepared data: ROUNDS times, alternately,
STEPS training steps (timed) and one online evaluation of the EMA model (timed, train/online.py, the val kNN
the stage would log). Medians; cost = eval_s / (eval_every * step_s + eval_s), the share of training time
the evaluations add at the default interval (stage-end evaluation not counted: it is the same with it off).

    python scripts/online_cost.py [--prepared data/prepared] [--rounds 3] [--steps 20]

Numbers on a shared machine are "under contention"; both sides of each ratio are measured in the same rounds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def measure(kind: str, cfg, prep, rounds: int, steps: int) -> dict:
    from diffrep.eval.features import feature_fn
    from diffrep.eval.probe import Probe
    from diffrep.models.ldae import Ldae
    from diffrep.models.soda import Soda
    from diffrep.models.ul import UnifiedLatents
    from diffrep.runtime import resolve_runtime
    from diffrep.train import Trainer
    from diffrep.train.online import OnlineEval

    rt = resolve_runtime(cfg.runtime)
    x = prep.images_float("train")
    if kind == "soda":
        model, tcfg = Soda(cfg.soda, prep.image_shape), cfg.soda.train
    elif kind == "ul_stage1":
        model, tcfg = UnifiedLatents(cfg.ul.stage1, prep.image_shape), cfg.ul.stage1.train
    else:
        model, tcfg = Ldae(cfg.ldae, prep.image_shape), cfg.ldae.train
        model.fit_tokenizer(x, seed=cfg.seed)
    probe = Probe(cfg.probe, torch.from_numpy(prep.labels("train")), prep.num_classes, cfg.seed)
    online = OnlineEval(lambda m: feature_fn(m, kind, device=rt.device), probe, x, prep.images_float("val"),
                        torch.from_numpy(prep.labels("val")), tcfg)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, tcfg, rt, {"images": x}, seed=cfg.seed, ckpt_dir=Path(tmp), fingerprint="cost",
                          run_name=kind, progress=False)
        trainer.model.train()
        trainer.train_step(0)  # warm-up: first-call allocations
        online.measure(trainer.ema)
        step_s, eval_s = [], []
        for r in range(rounds):
            t = time.perf_counter()
            for s in range(steps):
                trainer.train_step(1 + r * steps + s)
            step_s.append((time.perf_counter() - t) / steps)
            eval_s.append(online.measure(trainer.ema)[1])
    st, ev = statistics.median(step_s), statistics.median(eval_s)
    every = tcfg.eval_every
    return {"eval_every": every, "steps": tcfg.steps, "step_s": round(st, 4), "eval_s": round(ev, 3),
            "evaluations": -(-tcfg.steps // every) if every else 0,
            "share_of_training": round(ev / (every * st + ev), 4) if every else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    from diffrep.config import load_config
    from diffrep.data.prepared import load_prepared

    cfg = load_config(args.params)
    torch.manual_seed(cfg.seed)
    prep = load_prepared(args.prepared)
    out = {k: measure(k, cfg, prep, args.rounds, args.steps) for k in ("soda", "ul_stage1", "ldae")}
    out["threads"] = torch.get_num_threads()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
