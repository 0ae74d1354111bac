"""bf16 autocast, the GPU default (`runtime.precision: auto`), run through the same engine on CPU.

CPU autocast supports bfloat16, so the mixed-precision path of every pipeline model (the
step bench/ times: batch gather, autocast forward, fp32 loss and optimizer) is exercised
here even without CUDA: matmuls and convolutions really run in bf16, the weights stay fp32,
and the loss agrees with the fp32 loss to bf16 accuracy.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bench.models import MODELS, build
from diffrep.config import RuntimeConfig, load_config
from diffrep.runtime import resolve_runtime

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"train": {"batch_size": 8}}  # one step of a small batch is enough to compare precisions


def small_cfg():
    return load_config(ROOT / "params.yaml", {"soda": SMALL, "ldae": SMALL, "ul": {"stage1": SMALL, "stage2": SMALL}})


def first_step_loss(name: str, precision: str, tmp_path: Path) -> tuple[float, set, nn.Module]:
    from bench.train import make_trainer

    cfg = small_cfg()
    spec = build(name, cfg, (1, 16, 16))
    runtime = resolve_runtime(RuntimeConfig(device="cpu", precision=precision, num_threads=0))
    dtypes: set = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
             for m in spec.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    trainer = make_trainer(spec, runtime, tmp_path / f"ckpt-{precision}")
    before = {k: v.detach().clone() for k, v in spec.model.named_parameters()}
    values, _lr, _over = trainer.train_step(0)
    for h in hooks:
        h.remove()
    moved = any(not torch.equal(before[k], v) for k, v in spec.model.named_parameters())
    assert moved, f"{name}: no parameter changed after one {precision} step"
    return values[0], dtypes, spec.model


@pytest.mark.parametrize("name", MODELS)
def test_bf16_autocast_step_matches_fp32(name, tmp_path):
    loss32, dtypes32, _ = first_step_loss(name, "fp32", tmp_path)
    loss16, dtypes16, model = first_step_loss(name, "bf16", tmp_path)
    assert dtypes32 == {torch.float32}
    assert torch.bfloat16 in dtypes16, f"{name}: no Linear/Conv2d ran in bf16 under autocast"
    assert all(p.dtype == torch.float32 for p in model.parameters()), "autocast must leave the weights fp32"
    assert torch.isfinite(torch.tensor(loss16))
    assert loss16 == pytest.approx(loss32, rel=0.05), f"{name}: bf16 loss {loss16} vs fp32 {loss32}"
