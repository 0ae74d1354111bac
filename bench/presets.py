"""Every model of every preset (presets/*.yaml over params.yaml): parameters, FLOPs per image, one CPU step.

    python -m bench.presets            # -> bench/results/presets.json and the table in docs/presets.md

FLOPs are torch.utils.flop_counter's count (matmuls, convolutions, attention; not elementwise ops) of one
training forward + backward at batch 1, per image. GPU-hours per stage = steps x batch x FLOPs/img at
an assumed achieved rate: an ESTIMATE until `make gpu-check` measures the rate on the GPU.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from diffrep.config import Config, image_size_problems, load_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))
MODELS = ("soda", "ul_stage1", "ul_stage2", "ldae")
ASSUMED_TFLOPS = 200.0  # achieved bf16 rate assumed for the estimate (about 20-40% of an H100/H200's dense peak)


def preset_config(path: Path) -> Config:
    return load_config(ROOT / "params.yaml", overrides=yaml.safe_load(path.read_text()))


def channels(cfg: Config) -> int:
    return 1 if cfg.data.source in ("mnist5k", "digits") else 3


def shape_of(cfg: Config) -> tuple[int, int, int]:
    return (channels(cfg), cfg.data.image_size, cfg.data.image_size)


def train_cfg(cfg: Config, name: str):
    return {"soda": cfg.soda.train, "ul_stage1": cfg.ul.stage1.train, "ul_stage2": cfg.ul.stage2.train,
            "ldae": cfg.ldae.train}[name]


def build_meta(cfg: Config, name: str) -> torch.nn.Module:
    """The model as its stage builds it, on the meta device (no memory, no init cost): for counting."""
    from diffrep.models.ldae import Ldae
    from diffrep.models.soda import Soda
    from diffrep.models.ul import UlBase, UnifiedLatents

    shape = shape_of(cfg)
    with torch.device("meta"):
        if name == "soda":
            return Soda(cfg.soda, shape)
        if name == "ul_stage1":
            return UnifiedLatents(cfg.ul.stage1, shape)
        if name == "ul_stage2":
            latent = UnifiedLatents(cfg.ul.stage1, shape).latent_shape
    if name == "ul_stage2":  # its schedule set-up computes a float at build time: built on the CPU
        return UlBase(cfg.ul.stage2, latent, cfg.ul.stage1.logsnr_z0)
    with torch.device("meta"):
        return Ldae(cfg.ldae, shape)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny_batch(path: Path, batch: int) -> Config:
    """The preset with every training batch set to `batch` (micro_batch off)."""
    over = yaml.safe_load(path.read_text())
    t = {"batch_size": batch, "micro_batch": 0}
    for keys in (("soda",), ("ul", "stage1"), ("ul", "stage2"), ("ldae",)):
        node = over
        for k in keys:
            node = node.setdefault(k, {})
        node["train"] = {**node.get("train", {}), **t}
    return load_config(ROOT / "params.yaml", overrides=over)


def step_and_flops(path: Path, name: str, batch: int = 2) -> tuple[int, float]:
    """One real Trainer step of `name` at `batch` on CPU (fp32); FLOPs per image of its forward + backward."""
    from bench.models import build
    from bench.train import count_flops, make_trainer
    from diffrep.config import RuntimeConfig
    from diffrep.runtime import resolve_runtime

    cfg = tiny_batch(path, batch)
    spec = build(name, cfg, shape_of(cfg))
    rt = resolve_runtime(RuntimeConfig(device="cpu", precision="fp32"))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(spec, rt, Path(tmp))
        trainer.model.train()
        stats, _, _ = trainer.train_step(0)
        flops = count_flops(trainer, 1)
    return flops // batch, stats[0]


def table(rows: list[dict]) -> str:
    lines = ["| preset | model | params (M) | GFLOPs/img (fwd+bwd) | steps x batch | GPU-hours (estimate) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['model']} | {r['params'] / 1e6:.1f} | {r['gflops_per_image']:.2f} | "
                     f"{r['steps']} x {r['batch_size']} | {r['gpu_hours_estimate']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    rows = []
    for path in PRESETS:
        cfg = preset_config(path)
        for name in MODELS:
            assert not image_size_problems(cfg, name), image_size_problems(cfg, name)
            t = train_cfg(cfg, name)
            flops, loss = step_and_flops(path, name)
            hours = t.steps * t.batch_size * flops / (ASSUMED_TFLOPS * 1e12) / 3600
            rows.append({"preset": path.stem, "model": name, "params": n_params(build_meta(cfg, name)),
                         "gflops_per_image": flops / 1e9, "steps": t.steps, "batch_size": t.batch_size,
                         "gpu_hours_estimate": hours, "cpu_step_loss": loss})
            print(rows[-1], flush=True)
    out = {"assumed_achieved_tflops": ASSUMED_TFLOPS, "rows": rows,
           "note": "FLOPs counted by torch.utils.flop_counter at batch 1 on CPU; GPU-hours are an estimate"}
    (ROOT / "bench/results/presets.json").write_text(json.dumps(out, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
