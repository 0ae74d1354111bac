"""Online representation quality (train/online.py): val kNN during training, best-step selection, exact resume."""
from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from diffrep.config import ConfigError, LinearProbeConfig, RuntimeConfig, TrainConfig, parse_config
from diffrep.eval.probe import Probe
from diffrep.runtime import resolve_runtime
from diffrep.train import Trainer
from diffrep.train.online import OnlineEval

CPU = resolve_runtime(RuntimeConfig(device="cpu"))
PROBE = LinearProbeConfig(knn_k=(1, 3, 5))


class Killed(Exception):
    pass


class Net(nn.Module):
    """Denoising regression whose hidden layer is the 'representation'; dropout draws from torch's global RNG."""

    def __init__(self, killed_at: int | None = None):
        super().__init__()
        self.enc, self.drop, self.dec = nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 4)
        self.killed_at = killed_at

    def forward(self, batch, rng):
        if rng.step == self.killed_at:
            raise Killed
        x = batch["x"]  # (B, 4)
        out = self.dec(self.drop(torch.tanh(self.enc(x + 0.3 * rng.randn(x.shape[1:])))))
        mse = (out - x).pow(2).mean()
        return mse, {"mse": mse.detach()}


def data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 4, generator=g) * 0.7 + torch.eye(4)[y] * 1.5  # (n, 4): three clusters
    return x, y


def greedy_features(m: nn.Module):
    """Features that also draw from the global RNG: without the forked RNG they would shift training."""
    def fn(x):
        torch.rand(3)
        return torch.tanh(m.enc(x))
    return fn


def train(tmp, cfg: TrainConfig, *, killed_at=None, online=True):
    (tx, ty), (vx, vy) = data(48, 1), data(30, 2)
    ev = OnlineEval(greedy_features, Probe(PROBE, ty, 3, 0), tx, vx, vy, cfg) if online else None
    torch.manual_seed(0)
    trainer = Trainer(Net(killed_at), cfg, CPU, {"x": tx}, seed=5, ckpt_dir=tmp / "ckpt", fingerprint="f",
                      run_name="t", progress=False, online=ev)
    return trainer.fit(), ev


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(steps=20, batch_size=8, lr=2e-2, warmup_steps=2, ckpt_every=5, log_every=2,
                                 ema_decay=0.8, eval_every=3), **kw})


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_online_eval_leaves_the_training_trajectory_bit_identical(tmp_path):
    off, _ = train(tmp_path / "off", cfg(eval_every=0), online=False)
    on, ev = train(tmp_path / "on", cfg())
    assert [r[0] for r in ev.rows] == [3, 6, 9, 12, 15, 18, 20]  # every 3 steps and the last step
    assert all(0 <= r[1] <= 1 and r[2] in PROBE.knn_k for r in ev.rows)
    assert same(off.model, on.model) and same(off.ema, on.ema)  # select: last keeps the last EMA weights
    assert ev.finish(on.ema)["selected_step"] == 20 and same(off.ema, on.ema)


def test_select_best_is_the_measured_argmax_and_survives_kill_and_resume(tmp_path):
    full, ev = train(tmp_path / "full", cfg(select="best"))
    summary = ev.finish(full.ema)
    scores = [r[1] for r in ev.rows]
    first_best = ev.rows[scores.index(max(scores))][0]  # ties go to the earlier step
    assert summary["selected_step"] == summary["best_step"] == first_best
    assert summary["val_knn_selected"] == max(scores) and first_best != ev.rows[-1][0]  # here best is not last
    # the weights now in the EMA model are the ones that scored: measuring them again gives the same number
    assert ev.measure(full.ema)[0]["val_knn"] == summary["val_knn_selected"]

    with pytest.raises(Killed):  # dies during update 12: the last checkpoint is step 10
        train(tmp_path / "cut", cfg(select="best"), killed_at=11)
    resumed, ev2 = train(tmp_path / "cut", cfg(select="best"))
    assert resumed.resumed_from_step == 10
    assert [r[:3] for r in ev2.rows] == [r[:3] for r in ev.rows]  # evaluations before the kill came back too
    assert ev2.finish(resumed.ema) | {"online_eval_s": 0} == summary | {"online_eval_s": 0}
    assert same(full.ema, resumed.ema) and same(full.model, resumed.model)


def test_select_best_without_an_interval_is_refused_by_name():
    with pytest.raises(ConfigError, match="select: best needs train.eval_every"):
        parse_config({"soda": {"train": {"select": "best", "eval_every": 0}}})


def test_a_stage_without_a_representation_refuses_eval_every(prepared_digits, tmp_path):
    from diffrep.stages import feature_net

    shutil.copytree(prepared_digits[0] / "data", tmp_path / "data")
    c = parse_config({"data": {"source": "digits", "image_size": 8}, "runtime": {"device": "cpu"},
                      "feature_net": {"width": 8, "train": {"steps": 2, "batch_size": 32, "eval_every": 1}}})
    with pytest.raises(ValueError, match="stage feature_net: train.eval_every=1"):
        feature_net.run(c, tmp_path)
    assert not (tmp_path / "models").exists() and not (tmp_path / "metrics/feature_net.json").exists()


def test_ldae_stage_selects_the_best_step_and_records_it(prepared_digits, tmp_path):
    from diffrep.data.prepared import load_prepared
    from diffrep.eval.features import feature_fn
    from diffrep.io import read_json
    from diffrep.models import artifact
    from diffrep.stages import ldae

    shutil.copytree(prepared_digits[0] / "data", tmp_path / "data")
    c = parse_config({"data": {"source": "digits", "image_size": 8}, "runtime": {"device": "cpu"},
                      "probe": {"knn_k": [5, 10]},
                      "ldae": {"pca_dim": 4, "pca_fit_patches": 1000, "vit": {"patch_size": 4, "dim": 16, "depth": 2,
                                                                               "heads": 2},
                               "train": {"steps": 12, "batch_size": 32, "ckpt_every": 6, "log_every": 4,
                                         "eval_every": 4, "select": "best"}}}, "test")
    m = ldae.run(c, tmp_path)
    rows = (tmp_path / "metrics/ldae_online.tsv").read_text().splitlines()
    assert rows[0] == "step\tval_knn\tknn_k\teval_s" and [r.split("\t")[0] for r in rows[1:]] == ["4", "8", "12"]
    on = read_json(tmp_path / "metrics/ldae.json")["online"]
    accs = [float(r.split("\t")[1]) for r in rows[1:]]
    assert on["selected_step"] == [4, 8, 12][accs.index(max(accs))] and on["evaluations"] == 3
    assert m["lineage"]["selection"] == {"select": "best", "selected_step": on["selected_step"],
                                         "val_knn_selected": on["val_knn_selected"]}
    assert m["lineage"]["params"]["probe.knn_k"] == [5, 10]
    # the saved model is the selected one: its val kNN, measured again from the artifact, is the recorded number
    prep, model = load_prepared(tmp_path / "data/prepared"), artifact.load_model(tmp_path / "models/ldae", "ldae")
    fn = feature_fn(model, "ldae")
    probe = Probe(c.probe, torch.from_numpy(prep.labels("train")), prep.num_classes, 0)
    again = probe.choose((fn(prep.images_float("train")), fn(prep.images_float("val"))),
                         torch.from_numpy(prep.labels("val")), linear=False)
    assert again["val_knn"] == pytest.approx(on["val_knn_selected"], abs=1e-6)

    off = c.ldae.model_copy(update={"train": c.ldae.train.model_copy(update={"eval_every": 0, "select": "last"})})
    assert "online" not in ldae.run(c.model_copy(update={"ldae": off}), tmp_path)  # off: no summary; the declared
    assert (tmp_path / "metrics/ldae_online.tsv").read_text() == "step\tval_knn\tknn_k\teval_s\n"  # plot: header only
