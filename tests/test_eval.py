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


def test_frechet_distance_matches_closed_form_of_two_gaussians():
    from diffrep.eval.fid import frechet_distance

    rng = np.random.default_rng(0)
    D = 6
    a, b = rng.normal(size=(D, D)), rng.normal(size=(D, D))
    x = rng.normal(size=(400, D)) @ a + 1.0
    y = rng.normal(size=(300, D)) @ b * 0.5 - 0.5
    got = frechet_distance(torch.from_numpy(x), torch.from_numpy(y))
    want = _closed_form_fd(x, y)
    assert got == pytest.approx(want, rel=1e-6)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_bad_input_is_rejected():
    from diffrep.eval.fid import frechet_distance

    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0)) * 3
    assert abs(frechet_distance(x, x)) < 1e-6
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(x, x[:, :4])
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(x, torch.full((10, 8), float("nan")))


def test_kid_is_zero_for_one_distribution_and_grows_quadratically_with_a_shift():
    from diffrep.eval.fid import kernel_distance

    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(600, 8, generator=g), torch.randn(600, 8, generator=g)
    same, same_std = kernel_distance(real, fake, subsets=20, subset_size=300)
    small, _ = kernel_distance(real, fake + 0.25, subsets=20, subset_size=300)
    big, _ = kernel_distance(real, fake + 0.5, subsets=20, subset_size=300)
    assert abs(same) < 3 * same_std + 1e-3  # unbiased: centred on 0, may be slightly negative
    assert 0 < small < big
    assert 2.5 < big / small < 6  # MMD^2 ~ |shift|^2 for small shifts: doubling it ~4x
    again, _ = kernel_distance(real, fake + 0.25, subsets=20, subset_size=300)
    assert again == small  # subsets drawn under a fixed seed


def test_distances_names_the_feature_space():
    from diffrep.eval.fid import distances

    x = torch.randn(50, 4)
    d = distances(x, x + 1, space="featnet", subsets=5, subset_size=20)
    assert set(d) == {"fd_featnet", "kid_featnet", "kid_featnet_std"}
    assert d["fd_featnet"] == pytest.approx(4.0, rel=1e-6)  # a pure mean shift of 1 in 4 dims


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
    from diffrep.eval.fid import InceptionFeatures, distances
    from diffrep.io import ArtifactError

    ref, weights = random_inception
    inc = InceptionFeatures(weights)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    f = inc(x)
    assert f.shape == (3, 2048) and torch.isfinite(f).all()
    u8 = ((x + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
    torch.testing.assert_close(f, ref(u8)[0].reshape(3, -1))  # the file's weights, the reference resize
    assert distances(f, f, space="inception", subsets=2, subset_size=3)["fd_inception"] == pytest.approx(0, abs=1e-3)
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
def test_probe_reaches_100_percent_on_linearly_separable_features():
    from diffrep.stages.linear_probe import probe_all

    cfg = parse_config({"probe": {"seeds": [0, 1, 2], "epochs": 50, "batch_size": 50}})
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(300, 10, generator=g) * 0.3
    x[torch.arange(300), y] += 3.0  # class c lives along axis c
    r = probe_all([(x[:200], x[200:])] * 3, y[:200], y[200:], 3, cfg)
    assert r["linear"]["mean"] == pytest.approx(1.0) and len(r["linear"]["runs"]) == 3
    assert r["knn"]["mean"] == pytest.approx(1.0) and r["dim"] == 10


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
    from diffrep.io import read_json
    from diffrep.stages import feature_net, generation_eval, linear_probe, report

    cfg = parse_config({
        "data": {"source": "digits", "image_size": 8},
        "runtime": {"device": "cpu"},
        "feature_net": {"width": 8, "train": {"steps": 15, "batch_size": 64, "ckpt_every": 100, "log_every": 5}},
        "probe": {"seeds": [0, 1, 2], "epochs": 5, "pca_dim": 8},
        "eval": {"n_samples": 100, "kid_subsets": 5, "kid_subset_size": 50},
    }, "test")
    fm = feature_net.run(cfg, tiny_root)
    assert fm["feature_dim"] == 32
    # the metric is the saved classifier's accuracy on the test split, and 15 steps beat chance (1/10) clearly
    prep = load_prepared(tiny_root / "data/prepared")
    net = load_feature_net(tiny_root / "models/feature_net")
    right = net.predict(prep.images_float("test")) == torch.from_numpy(prep.labels("test"))
    assert fm["test_accuracy"] == pytest.approx(right.float().mean().item(), abs=1e-6) and fm["test_accuracy"] > 0.3
    assert (tiny_root / "models/feature_net/model.pt").is_file()
    assert not (tiny_root / ".cache/checkpoints").exists() or not any((tiny_root / ".cache/checkpoints").iterdir())

    pm = linear_probe.run(cfg, tiny_root)  # no diffusion models here: baselines only, the models listed as missing
    assert pm["missing"] == ["soda", "ul", "ldae"]
    assert set(pm["representations"]) == {"raw_pixels", "pca"}
    assert pm["probe_raw_pixels"] > 0.5 and pm["representations"]["pca"]["dim"] == 8
    assert pm["lineage"]["stage"] == "linear_probe"
    bars = (tiny_root / "metrics/linear_probe_bars.csv").read_text().splitlines()
    assert bars[0] == "representation,accuracy,std,group" and len(bars) == 3
    assert (tiny_root / "results/linear_probe/probe_bars.png").is_file()

    # the Inception branch, on 6 images per set: labelled as Inception, never mixed with the feature-net keys
    inc_cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(
        update={"n_samples": 6, "inception_weights": str(random_inception[1])})})
    im = generation_eval.run(inc_cfg, tiny_root)
    assert im["inception_fid_floor"] >= 0 and "inception_kid_floor" in im and "inception_fid" not in im
    assert im["fd_featnet_floor"] != im["inception_fid_floor"]

    gm = generation_eval.run(cfg, tiny_root)  # floor only: no UL / SODA here
    assert gm["n"] == 100 and gm["fd_featnet_floor"] > 0 and gm["missing"] == ["ul", "soda"]
    assert "inception_fid" not in gm and "fd_featnet" not in gm
    assert read_json(tiny_root / "metrics/generation_eval.json")["lineage"]["inputs"]

    # a fabricated UL result, to render every table of the report
    g = read_json(tiny_root / "metrics/generation_eval.json")
    g |= {"fd_featnet": 3.0, "kid_featnet": 0.01, "kid_featnet_std": 0.001,
          "fd_featnet_ratio": 3.0 / g["fd_featnet_floor"],
          "fd_featnet_ul_recon": 1.0, "kid_featnet_ul_recon": 0.002, "fd_featnet_ul_recon_floor": 0.5,
          "ul_recon_psnr": 20.0, "ul_recon_ssim": 0.8, "ul_bits_per_pixel": 0.1}
    from diffrep.io import write_json

    write_json(tiny_root / "metrics/generation_eval.json", g)
    row = {"features": 0.95, "raw_pixels": 0.93, "random_init": 0.94, "features_only": 30, "raw_pixels_only": 10,
           "p_value": 0.002}
    write_json(tiny_root / "metrics/ldae.json", {"knn_by_normalization": {"none": row, "standardize": row}})
    published = []
    monkeypatch.setenv("DIFFREP_FLOW_RUN_ID", "flow-123")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setattr("prefect.artifacts.create_markdown_artifact", lambda **kw: published.append(kw))
    out = report.run(cfg, tiny_root)
    md = (tiny_root / "reports/report.md").read_text()
    assert out["published"] and published[0]["key"] == "diffrep-report" and published[0]["markdown"] == md
    for text in ("## Linear probe", "raw_pixels", "## Generation", "FD (featnet)", "## Reconstruction",
                 "## l-DAE kNN against raw pixels", "| standardize | 95.0% | 94.0% | 93.0% | 30 / 10 (p = 0.002) |",
                 "## Lineage", "`metrics/feature_net.json`", "## Params", "Inception FID: not measured",
                 "figures/linear_probe_bars.png", "soda, ul_stage1, ul_stage2."):
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


def test_knn_correct_agrees_with_knn_accuracy():
    from diffrep.eval.probe import knn_accuracy, knn_correct

    g = torch.Generator().manual_seed(0)
    train_y, test_y = torch.arange(60) % 3, torch.arange(30) % 3
    centres = torch.randn(3, 8, generator=g) * 3
    train_x = centres[train_y] + torch.randn(60, 8, generator=g)
    test_x = centres[test_y] + torch.randn(30, 8, generator=g)
    correct = knn_correct(train_x, train_y, test_x, test_y, 3, k=5)
    assert correct.shape == (30,) and correct.dtype == torch.bool
    assert correct.sum().item() / 30 == knn_accuracy(train_x, train_y, test_x, test_y, 3, k=5)


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
