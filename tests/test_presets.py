"""presets/*.yaml: valid over params.yaml, every stage's networks fit the image size, models build at paper sizes.

The CPU step and FLOP count of every preset model (seconds each on 2 cores) run in `make scale`.
"""
from __future__ import annotations

import math

import pytest

from bench.presets import MODELS, PRESETS, build_meta, n_params, preset_config, step_and_flops
from diffrep.config import image_size_problems

STAGES = ("soda", "ul_stage1", "ul_stage2", "ldae", "feature_net")


def test_there_are_the_three_benchmark_presets():
    assert sorted(p.stem for p in PRESETS) == ["cifar10", "imagenet64", "tinyimagenet"]


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_builds_every_model_at_paper_scale(path):
    cfg = preset_config(path)
    assert cfg.data.source in ("torchvision", "imagefolder") and cfg.data.path
    assert cfg.runtime.precision == "auto"  # bf16 autocast on CUDA
    for stage in STAGES:
        assert image_size_problems(cfg, stage) == [], stage
    counts = {name: n_params(build_meta(cfg, name)) for name in MODELS}
    assert 20e6 < counts["soda"] < 200e6  # ResNet encoder + 128-channel UNet
    assert 20e6 < counts["ldae"] < 150e6  # ViT-S or ViT-B trunk (encoder + decoder halves) and its heads
    assert all(math.isfinite(v) and v > 1e6 for v in counts.values())
    enc = cfg.soda.encoder
    assert enc.width >= 64 and enc.stages == 4 and cfg.soda.unet.channels == 128


@pytest.mark.slow
@pytest.mark.scale
@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_model_steps_on_cpu_and_has_flops(path):
    for name in MODELS:
        flops, loss = step_and_flops(path, name)
        assert flops > 1e8 and math.isfinite(loss), name


def test_params_preset_write_gives_a_complete_equal_params_file(tmp_path, capsys):
    import yaml

    from diffrep.cli import main
    from diffrep.config import Config, load_config, to_dict
    from test_params import unset_fields

    out = tmp_path / "params.yaml"
    path = [p for p in PRESETS if p.stem == "cifar10"][0]
    assert main(["params", "--preset", str(path), "--write", str(out)]) == 0
    assert unset_fields(Config, yaml.safe_load(out.read_text())) == []  # every key spelled out for DVC
    assert to_dict(load_config(out)) == to_dict(preset_config(path))
    bad = tmp_path / "bad.yaml"
    bad.write_text("soda: {unet: {chanels: 3}}\n")
    assert main(["params", "--preset", str(bad)]) == 2
    assert "chanels" in capsys.readouterr().err
