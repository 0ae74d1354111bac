"""How the normalisation before a cosine kNN moves the verdict between two representations.

A research analysis the l-DAE stage reports (`knn_by_normalization`): the same
weighted cosine kNN after no normalisation, after centring, and after
standardising each dimension with training-set statistics (the linear probe's
BatchNorm without affine), for the features under study, raw pixels and an
untrained copy of the network, with an exact McNemar test of features against
raw pixels on the same test images under each normalisation.
"""
from __future__ import annotations

from typing import Callable

import torch

from diffrep.eval.paired import mcnemar_exact
from diffrep.eval.probe import KNN_NORMALIZATIONS, accuracy, normalize_for_knn

Pair = tuple[torch.Tensor, torch.Tensor]  # (train features (N, D), test features (M, D))


def knn_by_normalization(knn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], features: Pair,
                         raw_pixels: Pair, random_init: Pair) -> dict[str, dict]:
    """knn(train, test) -> per-test-image correctness (M,) bool. Returns {normalisation: accuracies and test}."""
    out = {}
    for how in KNN_NORMALIZATIONS:
        f, r, u = (knn(*normalize_for_knn(*pair, how)) for pair in (features, raw_pixels, random_init))
        test = mcnemar_exact(f, r)
        out[how] = {"features": accuracy(f), "raw_pixels": accuracy(r), "random_init": accuracy(u),
                    "features_only": test["a_only"], "raw_pixels_only": test["b_only"], "p_value": test["p_value"]}
    return out
