"""Evaluation: FD / KID through torchmetrics, DCI, the probe, the Inception path, the eval stages, the report."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from diffrep.config import parse_config
from diffrep.data.prepared import load_prepared
from diffrep.eval.feature_net import load_feature_net


# ---------------------------------------------------------------- Fréchet distance and KID
def _closed_form_fd(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.linalg import sqrtm

    mx, my = x.mean(0), y.mean(0)
    cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)  # unbiased, as torchmetrics
    covmean = sqrtm(cx @ cy).real
    return float(((mx - my) ** 2).sum() + np.trace(cx + cy - 2 * covmean))


def fd(x, y) -> float:
    from diffrep.eval.distances import frechet, stats

    return frechet(stats(torch.as_tensor(x)), stats(torch.as_tensor(y)))


def test_frechet_distance_matches_closed_form_of_two_gaussians():
    rng = np.random.default_rng(0)
    D = 6
    a, b = rng.normal(size=(D, D)), rng.normal(size=(D, D))
    x = rng.normal(size=(400, D)) @ a + 1.0
    y = rng.normal(size=(300, D)) @ b * 0.5 - 0.5
    assert fd(x, y) == pytest.approx(_closed_form_fd(x, y), rel=1e-6)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_bad_input_is_rejected():
    from diffrep.eval.distances import distances

    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0)) * 3
    assert abs(fd(x, x)) < 1e-6
    with pytest.raises(ValueError, match="same D"):
        distances(x, {"a": [x[:, :4]]}, resamples=20, seed=0)
    with pytest.raises(ValueError, match="NaN"):
        distances(x, {"a": [torch.full((10, 8), float("nan"))]}, resamples=20, seed=0)


def test_kid_is_zero_for_one_distribution_and_grows_quadratically_with_a_shift():
    from diffrep.eval.distances import KidKernels

    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(600, 8, generator=g), torch.randn(600, 8, generator=g)
    same, small, big = (KidKernels(real, fake + s).kid() for s in (0.0, 0.25, 0.5))
    assert abs(same) < 0.02 * small + 2e-3  # unbiased: centred on 0, may be slightly negative
    assert 0 < small < big
    assert 2.5 < big / small < 6  # MMD^2 ~ |shift|^2 for small shifts: doubling it ~4x


def test_a_pure_mean_shift_gives_its_squared_length():
    x = torch.randn(50, 4)
    assert fd(x, x + 1) == pytest.approx(4.0, rel=1e-6)  # a pure mean shift of 1 in 4 dims


# ---------------------------------------------------------------- the Inception path (offline, random weights)
@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """A randomly initialised FID Inception (no download) and its weights saved as the "standard weights file"."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            ref = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(ref.state_dict(), weights)
    return ref, weights


def test_inception_features_load_a_local_weights_file(random_inception, tmp_path):
    from diffrep.eval.fid import InceptionFeatures
    from diffrep.io import ArtifactError

    ref, weights = random_inception
    inc = InceptionFeatures(weights)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    f = inc(x)
    assert f.shape == (3, 2048) and torch.isfinite(f).all()
    u8 = ((x + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
    torch.testing.assert_close(f, ref(u8)[0].reshape(3, -1))  # the file's weights, the reference resize
    assert fd(f, f) == pytest.approx(0, abs=1e-3)
    with pytest.raises(ArtifactError, match="not found"):
        InceptionFeatures(tmp_path / "nope.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pth")
    with pytest.raises(ArtifactError, match="does not fit"):
        InceptionFeatures(tmp_path / "wrong.pth")


# ---------------------------------------------------------------- DCI
def test_dci_scores_a_disentangled_code_near_one_and_a_rotated_code_lower():
    from diffrep.eval.dci import completeness, dci, disentanglement

    rng = np.random.default_rng(0)
    K = 4
    f_tr, f_te = rng.random((1200, K)), rng.random((400, K))
    perfect = dci(f_tr, f_tr, f_te, f_te, bins=5, n_estimators=20)
    q, _ = np.linalg.qr(rng.normal(size=(K, K)))
    rotated = dci(f_tr @ q, f_tr, f_te @ q, f_te, bins=5, n_estimators=20)
    assert perfect["disentanglement"] > 0.85 and perfect["completeness"] > 0.85
    assert perfect["informativeness"] > 0.8
    assert rotated["disentanglement"] < perfect["disentanglement"] - 0.3
    assert rotated["completeness"] < perfect["completeness"] - 0.3
    lasso = dci(f_tr, f_tr, f_te, f_te, bins=5, method="lasso", lasso_c=1.0)
    assert lasso["disentanglement"] > 0.85
    # the closed forms on hand-made importance matrices
    assert disentanglement(np.eye(3)) == pytest.approx(1.0) and completeness(np.eye(3)) == pytest.approx(1.0)
    assert disentanglement(np.ones((3, 3))) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="same D"):
        dci(f_tr, f_tr, f_te[:, :2], f_te)


# ---------------------------------------------------------------- probe and random-init encoders
def test_probe_protocol_chooses_on_val_and_reaches_100_percent_on_separable_features():
    from diffrep.eval.probe import Probe

    cfg = parse_config({"probe": {"seeds": [0, 1, 2], "epochs": 50, "batch_size": 50, "bootstrap": 200}})
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 3
    x = torch.randn(400, 10, generator=g) * 0.3
    x[torch.arange(400), y] += 3.0  # class c lives along axis c
    probe = Probe(cfg.probe, y[:200], 3, run_seed=0)
    choice = probe.choose((x[:200], x[200:300]), y[200:300])
    assert choice["knn_k"] in (10, 20, 50) and choice["lr"] in (1e-2, 3e-2, 1e-1) and choice["val_linear"] == 1.0
    summary, scores = probe.report([(x[:200], x[300:])], y[300:], choice)
    assert summary["linear"]["acc"] == 1.0 and len(summary["linear"]["seed_runs"]) == 3
    assert summary["knn"]["acc"] == 1.0 and summary["dim"] == 10 and scores["linear"].shape == (100,)
    again, _ = probe.report([(x[:200], x[300:])], y[300:], choice)
    assert again == summary  # the same seed gives the same numbers


def test_probe_choice_is_made_on_val_not_on_the_evaluated_split():
    from diffrep.eval.probe import Probe

    cfg = parse_config({"probe": {"seeds": [0], "epochs": 5, "knn_k": [1, 50]}})
    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 2
    x = torch.randn(120, 4, generator=g)
    probe = Probe(cfg.probe, y[:100], 2, run_seed=0)
    val_y = y[100:].clone()
    val_x = x[:20].clone()  # val = copies of training points: k = 1 is exact there, so val must choose k = 1
    assert probe.choose((x[:100], val_x), y[:20], linear=False)["knn_k"] == 1
    assert "lr" not in probe.choose((x[:100], x[100:]), val_y, linear=False)


def test_build_encoder_random_init_is_seeded_and_keeps_buffers(tmp_path):
    from diffrep.config import LdaeConfig
    from diffrep.models.artifact import save_model
    from diffrep.models.ldae import Ldae
    from diffrep.stages.linear_probe import build_encoder

    vit = {"patch_size": 4, "dim": 16, "depth": 2, "heads": 2}
    cfg = LdaeConfig.model_validate({"pca_fit_patches": 100, "vit": vit})
    model = Ldae(cfg, (1, 8, 8))
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model.fit_tokenizer(x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # "trained": different from any fresh init
    save_model(tmp_path, model, kind="ldae", section=cfg.model_dump(mode="json"), image_shape=(1, 8, 8))
    trained = build_encoder(tmp_path, "ldae")
    torch.testing.assert_close(trained.features(x), model.eval().features(x))
    a, b = (build_encoder(tmp_path, "ldae", init_seed=s) for s in (1, 1))
    c = build_encoder(tmp_path, "ldae", init_seed=2)
    torch.testing.assert_close(a.features(x), b.features(x))
    assert not torch.allclose(a.features(x), c.features(x))
    assert not torch.allclose(a.features(x), trained.features(x))
    torch.testing.assert_close(a.tokenizer.basis, model.tokenizer.basis)  # the fitted tokenizer is kept


# ---------------------------------------------------------------- the stages on a tiny run, then the report
@pytest.fixture
def tiny_root(prepared_digits, tmp_path):
    src, _ = prepared_digits
    shutil.copytree(src / "data", tmp_path / "data")
    shutil.copytree(src / "metrics", tmp_path / "metrics")
    return tmp_path


def test_eval_stages_and_report_on_a_tiny_run(tiny_root, random_inception, monkeypatch):
    from diffrep.io import read_json, write_json
    from diffrep.stages import feature_net, fid_reference, generation_eval, linear_probe, report

    cfg = parse_config({
        "data": {"source": "digits", "image_size": 8},
        "runtime": {"device": "cpu"},
        "feature_net": {"width": 8, "train": {"steps": 15, "batch_size": 64, "ckpt_every": 100, "log_every": 5}},
        "probe": {"seeds": [0, 1, 2], "epochs": 5, "pca_dim": 8, "bootstrap": 200},
        "eval": {"n_samples": 100, "bootstrap": 20},
    }, "test")
    fm = feature_net.run(cfg, tiny_root)
    assert fm["feature_dim"] == 32 and fm["val_accuracy"] > 0.3
    # the metric is the saved classifier's accuracy on the test split, and 15 steps beat chance (1/10) clearly
    prep = load_prepared(tiny_root / "data/prepared")
    prep.release_test()
    net = load_feature_net(tiny_root / "models/feature_net")
    right = net.predict(prep.images_float("test")) == torch.from_numpy(prep.labels("test"))
    assert fm["test_accuracy"] == pytest.approx(right.float().mean().item(), abs=1e-6) and fm["test_accuracy"] > 0.3
    assert (tiny_root / "models/feature_net/model.pt").is_file()
    assert not (tiny_root / ".cache/checkpoints").exists() or not any((tiny_root / ".cache/checkpoints").iterdir())
    rm = fid_reference.run(cfg, tiny_root)
    assert rm["set"] == "test" and rm["n"] == read_json(tiny_root / "data/prepared/manifest.json")["counts"]["test"]

    pm = linear_probe.run(cfg, tiny_root)  # no diffusion models here: baselines only, the models listed as missing
    assert pm["missing"] == ["soda", "ul", "ldae"]
    assert set(pm["representations"]) == {"raw_pixels", "pca"}
    raw = pm["representations"]["raw_pixels"]
    assert pm["probe_raw_pixels"] == raw["linear"]["acc"] > 0.5 and pm["representations"]["pca"]["dim"] == 8
    assert raw["linear"]["ci95"][0] < raw["linear"]["acc"] < raw["linear"]["ci95"][1]
    assert raw["knn"]["interval"] == "wilson" and raw["knn"]["k"] in (10, 20, 50)
    assert raw["chosen_on_val"]["lr"] in (1e-2, 3e-2, 1e-1) and pm["comparisons"] == []  # nothing trained to compare
    assert pm["lineage"]["stage"] == "linear_probe"
    bars = (tiny_root / "metrics/linear_probe_bars.csv").read_text().splitlines()
    assert bars[0] == "representation,accuracy,ci_low,ci_high,group" and len(bars) == 3
    assert (tiny_root / "results/linear_probe/probe_bars.png").is_file()
    saved = np.load(tiny_root / "results/linear_probe/scores_raw_pixels_knn.npy")
    assert saved.shape == (rm["n"],) and saved.mean() == pytest.approx(raw["knn"]["acc"])  # per-image, test order

    # the Inception branch, on 6 images per set: labelled as Inception, never mixed with the feature-net keys
    inc_cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(
        update={"n_samples": 6, "inception_weights": str(random_inception[1])})})
    im = generation_eval.run(inc_cfg, tiny_root)
    assert im["fd_inception_floor"] >= 0 and "kid_inception_floor" in im and "fd_inception" not in im
    assert im["fd_featnet_floor"] != im["fd_inception_floor"]

    gm = generation_eval.run(cfg, tiny_root)  # floors only: no UL / SODA here
    assert gm["n_floor"] == 100 and gm["fd_featnet_floor"] > 0 and gm["missing"] == ["ul"]
    lo, hi = gm["fd_featnet_floor_ci95"]
    assert lo < hi and "fd_featnet_floor_train" in gm and "fd_featnet" not in gm
    assert gm["reference"]["files"][gm["reference"]["file"]] == rm["sha256"]
    assert "data/fid_reference" in read_json(tiny_root / "metrics/generation_eval.json")["lineage"]["inputs"]

    # a fabricated UL result (the floor set standing in for samples), to render every table of the report
    g = read_json(tiny_root / "metrics/generation_eval.json")
    g["featnet"]["samples"] = g["featnet"]["floor_val"]
    g["featnet"]["paired"].append({"a": "samples", "b": "floor_val", "metric": "fd", "diff": 0.0,
                                   "diff_ci95": [-0.1, 0.1], "p_value": 0.6, "ratio": 1.0, "ratio_ci95": [0.9, 1.1],
                                   "test": "paired bootstrap"})
    write_json(tiny_root / "metrics/generation_eval.json", g)
    row = {"features": 0.95, "raw_pixels": 0.93, "random_init": 0.94, "features_only": 30, "raw_pixels_only": 10,
           "p_value": 0.002}
    lp = read_json(tiny_root / "metrics/linear_probe.json")
    lp["knn_by_normalization"] = {"k": 20, "none": row, "standardize": row}
    lp["comparisons"] = [{"a": "raw_pixels", "b": "pca", "classifier": "linear", "verdict": "ties", "p_value": 0.4,
                          "test": "paired sign-flip permutation (2000 draws)"}]
    write_json(tiny_root / "metrics/linear_probe.json", lp)
    published = []
    monkeypatch.setenv("DIFFREP_FLOW_RUN_ID", "flow-123")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setattr("prefect.artifacts.create_markdown_artifact", lambda **kw: published.append(kw))
    out = report.run(cfg, tiny_root)
    md = (tiny_root / "reports/report.md").read_text()
    assert out["published"] and published[0]["key"] == "diffrep-report" and published[0]["markdown"] == md
    probe_row = f"{100 * raw['linear']['acc']:.1f}% [{100 * raw['linear']['ci95'][0]:.1f}, "
    for text in ("## Linear probe", "raw_pixels", probe_row, "| class | train | val | test |", "## Generation", "FD (featnet)",
                 "real val images (honest floor)", "cannot be told from", "**raw_pixels** ties with **pca**",
                 "## l-DAE kNN against raw pixels", "| standardize | 95.0% | 94.0% | 93.0% | 30 / 10 (p = 0.002) |",
                 "## Lineage", "`metrics/feature_net.json`", "## Params", "Inception FID: not measured",
                 "figures/linear_probe_bars.png", "soda, ul_stage1, ul_stage2"):
        assert text in md, text
    assert (tiny_root / "reports/figures/linear_probe_bars.png").is_file()


def test_publish_prefect_artifact_only_under_a_flow(monkeypatch):
    from diffrep.stages.report import publish_prefect_artifact

    monkeypatch.delenv("DIFFREP_FLOW_RUN_ID", raising=False)
    assert publish_prefect_artifact("# x") is False
    calls = []
    monkeypatch.setattr("prefect.artifacts.create_markdown_artifact", lambda **kw: calls.append(kw))
    assert publish_prefect_artifact("# x", flow_run_id="abc") is True and calls[0]["markdown"] == "# x"


def test_report_without_metrics_says_what_to_do(tmp_path):
    from diffrep.io import ArtifactError
    from diffrep.stages.report import run

    with pytest.raises(ArtifactError, match="dvc repro"):
        run(parse_config({}), tmp_path)


def test_mcnemar_exact_against_closed_forms():
    from diffrep.eval.paired import mcnemar_exact

    def vec(bits):
        return torch.tensor(bits, dtype=torch.bool)

    same = mcnemar_exact(vec([1, 0, 1]), vec([1, 0, 1]))
    assert same == {"a_only": 0, "b_only": 0, "p_value": 1.0}
    five = mcnemar_exact(vec([1] * 5 + [0] * 3), vec([0] * 5 + [0] * 3))  # a right on 5 images b misses
    assert (five["a_only"], five["b_only"]) == (5, 0) and five["p_value"] == pytest.approx(2 / 32)
    tie = mcnemar_exact(vec([1] * 10 + [0] * 10), vec([0] * 10 + [1] * 10))
    assert tie["p_value"] == 1.0
    # 9 vs 2 discordant: 2 * P(Bin(11, 1/2) <= 2) = 2 * (1 + 11 + 55) / 2048
    nine = mcnemar_exact(vec([1] * 9 + [0] * 2), vec([0] * 9 + [1] * 2))
    assert nine["p_value"] == pytest.approx(2 * 67 / 2048)
    with pytest.raises(ValueError, match="correctness"):
        mcnemar_exact(vec([1, 0]), vec([1, 0, 1]))


def test_knn_correct_on_planted_clusters():
    from diffrep.eval.probe import accuracy, knn_correct

    g = torch.Generator().manual_seed(0)
    train_y, test_y = torch.arange(60) % 3, torch.arange(30) % 3
    centres = torch.randn(3, 8, generator=g) * 3
    train_x = centres[train_y] + torch.randn(60, 8, generator=g)
    test_x = centres[test_y] + torch.randn(30, 8, generator=g)
    correct = knn_correct(train_x, train_y, test_x, test_y, 3, k=5)
    assert correct.shape == (30,) and correct.dtype == torch.bool
    assert accuracy(correct) == correct.sum().item() / 30 > 0.9  # well-separated clusters


def test_normalize_for_knn_uses_training_statistics():
    from diffrep.eval.probe import normalize_for_knn

    g = torch.Generator().manual_seed(1)
    train_x = torch.randn(50, 6, generator=g) * torch.arange(1.0, 7.0) + 5.0
    train_x[:, 0] = -1.0  # a constant dimension (an always-black border pixel)
    test_x = torch.randn(20, 6, generator=g)
    a, b = normalize_for_knn(train_x, test_x, "none")
    assert a is train_x and b is test_x
    a, b = normalize_for_knn(train_x, test_x, "center")
    torch.testing.assert_close(a.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(b, test_x - train_x.mean(0))
    a, b = normalize_for_knn(train_x, test_x, "standardize")
    bn = torch.nn.BatchNorm1d(6, affine=False).train()  # the probe's normalisation, on the training batch
    torch.testing.assert_close(a, bn(train_x))
    torch.testing.assert_close(b, (test_x - train_x.mean(0)) / torch.sqrt(train_x.var(0, unbiased=False) + 1e-5))
    assert torch.isfinite(b).all() and a[:, 0].abs().max() == 0  # the constant dimension stays finite
    with pytest.raises(ValueError, match="standardize"):
        normalize_for_knn(train_x, test_x, "whiten")


def test_knn_by_normalization_recomputes_and_its_counts_explain_the_gap():
    from diffrep.eval.knn_study import knn_by_normalization
    from diffrep.eval.probe import accuracy, knn_correct, normalize_for_knn

    g = torch.Generator().manual_seed(0)
    train_y, test_y = torch.arange(90) % 3, torch.arange(60) % 3
    centres = torch.randn(3, 6, generator=g) * 2

    def pair(scale):
        return (centres[train_y] + torch.randn(90, 6, generator=g) * scale,
                centres[test_y] + torch.randn(60, 6, generator=g) * scale)

    feats, raw, untrained = pair(0.5), pair(2.0), pair(3.0)

    def knn(a, b):
        return knn_correct(a, train_y, b, test_y, 3, k=5)

    out = knn_by_normalization(knn, feats, raw, untrained)
    assert list(out) == ["none", "center", "standardize"]
    for how, r in out.items():
        assert r["raw_pixels"] == accuracy(knn(*normalize_for_knn(*raw, how))), how
        assert r["features"] - r["raw_pixels"] == pytest.approx((r["features_only"] - r["raw_pixels_only"]) / 60)
    assert out["none"]["features"] > out["none"]["raw_pixels"]  # tighter clusters classify better
