"""Edit specificity (eval/control.py): the share of the read changes on the top factor, raw and over the noise floor."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrep.eval.control import edit_specificity, specificity

NAMES = ["shape", "hue", "scale"]


def test_specificity_closed_forms():
    assert specificity(np.array([0.6, 0.2, 0.2]), NAMES) == ("shape", pytest.approx(0.6))
    assert specificity(np.array([0.0, 0.5, 0.0]), NAMES) == ("hue", 1.0)
    assert specificity(np.zeros(3), NAMES) == (None, 0.0)  # nothing changed: no top factor


class Fake(torch.nn.Module):
    """z = (object id, a small offset); the render's channel 0 is z[0], channel 1 the noise plus z[1]."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.decoder = type("D", (), {"z_sizes": [1, 1]})()

    def encode(self, x):
        return x[:, :2, 0, 0]

    def decode(self, z, pose, noise, steps=None):
        return torch.stack([z[:, 0], noise[:, 0, 0, 0] + z[:, 1]], 1)[:, :, None, None]


class Reader:
    def predict(self, x):  # factor 0: the object id; factor 1: a sign, mostly the noise's; factor 2: constant
        return np.stack([x[:, 0, 0, 0].round().numpy(), (x[:, 1, 0, 0] > 0).numpy(), np.zeros(len(x))], 1)


def test_a_group_that_drives_one_factor_is_fully_specific_and_noise_reads_sit_in_the_floor():
    n = 64
    src = torch.zeros(n, 2, 1, 1)
    src[:, 0] = torch.arange(n, dtype=torch.float32)[:, None, None]  # every object differs in factor 0
    src[:, 1] = 0.3 * (-1.0) ** torch.arange(n)[:, None, None]  # neighbours differ by 0.6 in z[1]
    out = edit_specificity(Fake(), src, torch.zeros(n, 3), Reader(), NAMES, seed=0)
    g0, g1 = out["groups"]
    assert g0["change_rate"] == {"shape": 1.0, "hue": 0.0, "scale": 0.0}  # same noise: only the driven factor moves
    assert (g0["top_factor"], g0["specificity"]) == ("shape", 1.0)
    assert (g0["top_factor_over_floor"], g0["specificity_over_floor"]) == ("shape", 1.0)
    assert out["noise_floor"]["shape"] == 0.0 and 0.3 < out["noise_floor"]["hue"] < 0.7  # a new noise flips hue
    # group 1 nudges the noisy factor: some flips, all on hue (raw specificity 1), but fewer than a new noise
    # makes, so over the floor it controls nothing
    assert 0 < g1["change_rate"]["hue"] < out["noise_floor"]["hue"] and g1["change_rate"]["shape"] == 0.0
    assert (g1["top_factor"], g1["specificity"]) == ("hue", 1.0)
    assert (g1["top_factor_over_floor"], g1["specificity_over_floor"]) == (None, 0.0)
