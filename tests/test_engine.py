"""The training engine: schedule, EMA, resume determinism, guards, logs, BatchRNG and DDP (gloo)."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from diffrep.config import RuntimeConfig, TrainConfig
from diffrep.io import ArtifactError, load_torch
from diffrep.runtime import resolve_runtime
from diffrep.train import (BatchRNG, DistInfo, NonFiniteLossError, Trainer, ema_decay_at, lr_factor,
                           setup_distributed, teardown_distributed)
from diffrep.train import engine

CPU = resolve_runtime(RuntimeConfig(device="cpu"))




class Killed(Exception):
    """Stands in for a kill: raised inside a step, so nothing after the last checkpoint survives."""


class TinyMLP(nn.Module):
    """Denoising regression: per-sample noise from rng, optional dropout (uses torch's global RNG)."""

    def __init__(self, d: int = 4, h: int = 16, dropout: float = 0.0, nan_at: int | None = None,
                 killed_at: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, h), nn.SiLU(), nn.Dropout(dropout), nn.LayerNorm(h), nn.Linear(h, d))
        self.nan_at, self.killed_at = nan_at, killed_at

    def forward(self, batch, rng):
        if rng.step == self.killed_at:  # the process dies after `killed_at` updates
            raise Killed
        x = batch["x"]  # (B, d)
        noise = rng.randn(x.shape[1:])  # (B, d)
        mse = (self.net(x + 0.1 * noise) - batch["y"]).pow(2).mean()
        if self.nan_at is not None and rng.step == self.nan_at:
            mse = mse * float("nan")
        return mse, {"mse": mse.detach(), "noise_mean": noise.mean()}


def make_data(n: int = 30, d: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, d, generator=g)
    return {"x": x, "y": torch.tanh(x @ torch.randn(d, d, generator=g)), "label": torch.arange(n)}


def cfg(**kw) -> TrainConfig:
    base = dict(steps=20, batch_size=8, lr=1e-2, warmup_steps=3, ckpt_every=5, log_every=2, ema_decay=0.9)
    return TrainConfig(**{**base, **kw})


def run(tmp, train_cfg, *, fp="fp0", model_seed=0, dropout=0.1, nan_at=None, killed_at=None, data=None, **kw):
    torch.manual_seed(model_seed)
    model = TinyMLP(dropout=dropout, nan_at=nan_at, killed_at=killed_at)
    trainer = Trainer(model, train_cfg, CPU, data if data is not None else make_data(), seed=3,
                      ckpt_dir=tmp / "ckpt", fingerprint=fp, run_name="test", progress=False, **kw)
    return trainer.fit()


def assert_same_weights(a: nn.Module, b: nn.Module, exact: bool = True, atol: float = 0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        same = torch.equal(sa[k], sb[k]) if exact else torch.allclose(sa[k], sb[k], rtol=0, atol=atol)
        assert same, f"{k} differs (max |diff| {(sa[k] - sb[k]).abs().max().item():.3g})"


# ---------------------------------------------------------------- optimisation
def test_loss_falls_when_overfitting_one_batch(tmp_path):
    data = make_data(n=8)
    res = run(tmp_path, cfg(steps=150, warmup_steps=5, ema_decay=0.0, grad_clip=0), data=data, dropout=0.0)
    torch.manual_seed(0)
    fresh = TinyMLP()
    with torch.no_grad():
        start = fresh(data, BatchRNG(3, 0, 8))[0].item()
        end = res.model(data, BatchRNG(3, 0, 8))[0].item()
    assert end < 0.1 * start
    assert res.final_loss < 0.2 * start and res.steps_done == 150 and res.resumed_from_step is None
    assert set(res.last_terms) == {"mse", "noise_mean", "grad_norm"} and res.images_per_s > 0


def test_lr_schedule_closed_form():
    c = cfg(steps=101, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1)  # first update: lr / warmup
    assert lr_factor(9, c) == pytest.approx(1.0)  # end of warmup
    assert lr_factor(10, c) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_factor(55, c) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert lr_factor(100, c) == pytest.approx(0.1)  # last update: lr * min_lr_ratio
    assert lr_factor(0, cfg(steps=11, warmup_steps=0, min_lr_ratio=0.0)) == pytest.approx(1.0)


def test_ema_update_formula_on_first_step(tmp_path):
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in TinyMLP().state_dict().items()}
    res = run(tmp_path, cfg(steps=1, ema_decay=0.5, grad_clip=0.5), dropout=0.0)
    d = ema_decay_at(1, 0.5)
    assert d == pytest.approx(2 / 11) and ema_decay_at(1000, 0.5) == 0.5
    new = res.model.state_dict()
    for k, v in res.ema.state_dict().items():
        torch.testing.assert_close(v, d * init[k] + (1 - d) * new[k], rtol=0, atol=1e-6)
    assert not torch.equal(new["net.0.weight"], init["net.0.weight"])
    assert res.last_terms["grad_norm"] > 0


# ---------------------------------------------------------------- checkpoints and resume
@pytest.mark.parametrize("ckpt_every,kill", [(5, 10), (3, 10)])
def test_kill_and_resume_is_bit_identical(tmp_path, ckpt_every, kill):
    c = cfg(ckpt_every=ckpt_every)  # 30 items at batch 8: epochs of 3 batches, 6 items dropped each
    full = run(tmp_path / "full", c, loss_curve_path=tmp_path / "full.tsv")
    with pytest.raises(Killed):
        run(tmp_path / "kill", c, loss_curve_path=tmp_path / "kill.tsv", killed_at=kill)
    assert load_torch(tmp_path / "kill" / "ckpt" / "last.pt")["step"] == kill // ckpt_every * ckpt_every
    resumed = run(tmp_path / "kill", c, loss_curve_path=tmp_path / "kill.tsv")
    assert resumed.resumed_from_step == kill // ckpt_every * ckpt_every and resumed.steps_done == 20
    assert_same_weights(full.model, resumed.model)
    assert_same_weights(full.ema, resumed.ema)
    assert (tmp_path / "full.tsv").read_text() == (tmp_path / "kill.tsv").read_text()
    assert resumed.final_loss == full.final_loss
    again = run(tmp_path / "kill", c)  # finished run: nothing left to do
    assert again.resumed_from_step == 20 and again.steps_done == 20 and again.last_terms == full.last_terms
    assert_same_weights(full.model, again.model)


def test_checkpoint_contents_are_weights_only(tmp_path):
    run(tmp_path, cfg(steps=5))
    ck = load_torch(tmp_path / "ckpt" / "last.pt")  # weights_only=True
    assert ck["step"] == 5 and ck["fingerprint"] == "fp0"
    assert ck["data_order"] == {"epoch": 1, "position": 16, "n_items": 30, "batch_size": 8}
    assert {"model", "ema", "optimizer", "scheduler", "rng", "train_config"} <= set(ck)
    assert '"steps": 5' in ck["train_config"]


def test_checkpoint_from_another_fingerprint_is_refused(tmp_path):
    run(tmp_path, cfg(steps=5), fp="aaaa1111")
    with pytest.raises(ArtifactError) as e:
        run(tmp_path, cfg(steps=5), fp="bbbb2222")
    msg = str(e.value)
    assert str(tmp_path / "ckpt" / "last.pt") in msg and "aaaa1111" in msg and "bbbb2222" in msg
    assert "Delete the folder" in msg


def test_corrupt_checkpoint_is_refused_and_training_starts_fresh(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "last.pt").write_bytes(b"not a checkpoint")
    res = run(tmp_path, cfg(steps=5))
    assert res.resumed_from_step is None and res.steps_done == 5
    assert len(res.refused_checkpoints) == 1 and "last.pt: unreadable" in res.refused_checkpoints[0]
    err = capsys.readouterr().err
    assert "refused checkpoint" in err and "training from step 0 of 5" in err
    assert (tmp_path / "ckpt" / "last.pt.refused").read_bytes() == b"not a checkpoint"


def test_nan_guard_names_step_and_terms_and_keeps_last_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError) as e:
        run(tmp_path, cfg(steps=20, ckpt_every=5), nan_at=7)  # the 8th update
    msg = str(e.value)
    assert "step 8 of 20" in msg and "loss=nan" in msg and "mse=nan" in msg and "noise_mean=" in msg
    assert "(step 5) was kept" in msg and str(tmp_path / "ckpt" / "last.pt") in msg
    assert load_torch(tmp_path / "ckpt" / "last.pt")["step"] == 5


# ---------------------------------------------------------------- logs
def test_loss_curve_tsv_header_and_rows(tmp_path):
    c = cfg(steps=12, log_every=4, ckpt_every=100)
    run(tmp_path, c, loss_curve_path=tmp_path / "curve.tsv")
    lines = (tmp_path / "curve.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["step", "loss", "lr", "mse", "noise_mean", "grad_norm"]
    rows = [ln.split("\t") for ln in lines[1:]]
    assert [int(r[0]) for r in rows] == [4, 8, 12]
    for r in rows:  # lr of the logged update (0-based index step-1)
        assert float(r[2]) == pytest.approx(c.lr * lr_factor(int(r[0]) - 1, c), rel=1e-6)
        assert all(math.isfinite(float(v)) for v in r[1:])


def test_tensorboard_events_and_samples_do_not_perturb_training(tmp_path):
    def sample_fn(ema):  # uses torch's global RNG on purpose
        return torch.tanh(torch.randn(4, 1, 8, 8))

    c = cfg(steps=6, sample_every=2)
    logged = run(tmp_path / "a", c, log_dir=tmp_path / "runs", sample_fn=sample_fn)
    plain = run(tmp_path / "b", c)
    assert list((tmp_path / "runs").glob("events.out.tfevents.*"))
    assert_same_weights(logged.model, plain.model)


def test_time_budget_stops_early(tmp_path):
    res = run(tmp_path, cfg(steps=1000, time_budget_s=1e-9))
    assert res.stopped_early and res.steps_done == 1
    assert load_torch(tmp_path / "ckpt" / "last.pt")["step"] == 1


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="batch_size=8"):
        run(tmp_path, cfg(), data=make_data(n=5))
    with pytest.raises(ValueError, match="disagree"):
        run(tmp_path, cfg(), data={"x": torch.zeros(10, 4), "y": torch.zeros(9, 4)})

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2, 2))

        def forward(self, batch, rng):
            return (batch["x"][:, :2] @ self.w).pow(2).mean(dim=1), {}

    with pytest.raises(TypeError, match="scalar loss"):
        Trainer(Bad(), cfg(), CPU, make_data(), seed=0, ckpt_dir=tmp_path / "c", fingerprint="f", progress=False).fit()

    class Reserved(TinyMLP):
        def forward(self, batch, rng):
            loss, _ = super().forward(batch, rng)
            return loss, {"lr": loss.detach()}

    with pytest.raises(ValueError, match="reserved"):
        Trainer(Reserved(), cfg(), CPU, make_data(), seed=0, ckpt_dir=tmp_path / "r", fingerprint="f",
                progress=False).fit()


def test_batch_not_divisible_by_world_size(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "dist_info", lambda: DistInfo(rank=0, world_size=3))
    with pytest.raises(ValueError, match="not divisible by the number of DDP processes"):
        run(tmp_path, cfg(batch_size=8))


# ---------------------------------------------------------------- BatchRNG
def test_batch_rng_rank_slices_concatenate_to_the_global_draw():
    def draws(r: BatchRNG):
        return [r.randn(3, 2), r.rand(5), r.randint(10, 4), r.bernoulli(0.3, 6), r.uniform(-2.0, 2.0, (2, 2))]

    whole = draws(BatchRNG(11, 4, 8))
    parts = [draws(BatchRNG(11, 4, 8, offset=4 * r, local_batch=4)) for r in range(2)]
    for w, a, b in zip(whole, *parts):
        assert a.shape[0] == 4 and torch.equal(torch.cat([a, b]), w)
    assert whole[0].shape == (8, 3, 2) and whole[3].dtype == torch.bool
    assert (whole[4] >= -2).all() and (whole[4] < 2).all() and whole[2].max() < 10
    assert not torch.equal(BatchRNG(11, 5, 8).randn(3), BatchRNG(11, 4, 8).randn(3))
    with pytest.raises(ValueError):
        BatchRNG(0, 0, 8, offset=6, local_batch=4)


# ---------------------------------------------------------------- DDP (2 gloo processes)
def _ddp_worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pathlib import Path

    info = setup_distributed("cpu")
    try:
        assert info.world_size == world and info.rank == rank
        tmp = Path(tmp)
        # a different init on rank 1: DDP must broadcast rank 0's weights (and the EMA follow)
        res = run(tmp / "ddp", cfg(), model_seed=100 + rank, dropout=0.0, loss_curve_path=tmp / "ddp.tsv")
        torch.save({"model": res.model.state_dict(), "ema": res.ema.state_dict()}, tmp / f"rank{rank}.pt")
        micro = run(tmp / "micro", cfg(micro_batch=2), model_seed=100, dropout=0.0)  # 4 rows per rank: 2 x 2
        torch.save({"model": micro.model.state_dict()}, tmp / f"micro{rank}.pt")
    finally:
        teardown_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process(tmp_path):
    # fork: the children inherit the imported torch (spawn re-imports it: ~10 s per child on 2 busy cores);
    # they set one intra-op thread before any op, which keeps OpenMP fork-safe
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method=method)
    single = run(tmp_path / "single", cfg(), model_seed=100, dropout=0.0)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for part in ("model", "ema"):
        for k, v in single.model.state_dict().items() if part == "model" else single.ema.state_dict().items():
            assert torch.equal(r0[part][k], r1[part][k]), f"ranks disagree on {part}.{k}"
            torch.testing.assert_close(r0[part][k], v, rtol=0, atol=1e-6, msg=f"{part}.{k}")
    assert (tmp_path / "ddp.tsv").is_file() and load_torch(tmp_path / "ddp" / "ckpt" / "last.pt")["world_size"] == 2
    for k, v in single.model.state_dict().items():  # DDP + gradient accumulation: float rounding only
        m0, m1 = (torch.load(tmp_path / f"micro{r}.pt", weights_only=True)["model"][k] for r in range(2))
        assert torch.equal(m0, m1), f"ranks disagree on micro-batched {k}"
        torch.testing.assert_close(m0, v, rtol=0, atol=1e-5, msg=f"micro-batched {k}")
