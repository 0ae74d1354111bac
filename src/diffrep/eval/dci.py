"""DCI disentanglement (Eastwood & Williams, ICLR 2018) of a code against known generative factors.

For each factor k an estimator predicts the factor from the code (D dims); its
feature importances give column k of the importance matrix R (D x K), each
column normalised to sum 1 so every factor weighs the same. Then
  disentanglement  D = sum_i rho_i (1 - H_K(P_i.)),  P_ij = R_ij / sum_k R_ik,
                   rho_i = sum_k R_ik / sum R   (does each code dim capture one factor?)
  completeness     C = mean_k (1 - H_D(P~_.k)),   P~_ik = R_ik / sum_i R_ik
                                                  (is each factor captured by one code dim?)
  informativeness  I = mean_k test accuracy of the factor's estimator
with entropies in base K and D respectively, so all three lie in [0, 1].

Choices (documented, not the paper's exact protocol):
- Factors are *classified*, not regressed (the disentanglement_lib convention):
  a factor with at most `bins` distinct values is used as is (e.g. the shape
  class); a continuous one is cut into `bins` equal-frequency classes on the
  training codes. Circular factors (hues) then need no special handling.
- Estimators, the paper's two: `random_forest` (impurity importances of a
  RandomForestClassifier) or `lasso` (|coefficients| of an L1 logistic
  regression on standardised codes, summed over classes).
- Informativeness is test accuracy (higher is better), not the paper's
  prediction error; `chance` (majority-class accuracy) is reported beside it.
"""
from __future__ import annotations

import numpy as np


def discretize(train: np.ndarray, test: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Factors (N, K) -> integer classes (N, K); the bin edges come from the training rows."""
    out_tr, out_te = np.zeros(train.shape, np.int64), np.zeros(test.shape, np.int64)
    for k in range(train.shape[1]):
        values = np.unique(train[:, k])
        if len(values) <= bins:  # already categorical
            out_tr[:, k] = np.searchsorted(values, train[:, k])
            out_te[:, k] = np.clip(np.searchsorted(values, test[:, k]), 0, len(values) - 1)
        else:
            edges = np.quantile(train[:, k], np.linspace(0, 1, bins + 1)[1:-1])
            out_tr[:, k], out_te[:, k] = np.digitize(train[:, k], edges), np.digitize(test[:, k], edges)
    return out_tr, out_te


def _entropy(p: np.ndarray, base: int, axis: int) -> np.ndarray:
    """Entropy along `axis` of non-negative weights (normalised here), in log base `base`; 0 log 0 = 0."""
    p = p / np.clip(p.sum(axis=axis, keepdims=True), 1e-12, None)
    logp = np.log(np.where(p > 0, p, 1.0))
    return -(p * logp).sum(axis=axis) / np.log(base)


def disentanglement(R: np.ndarray) -> float:
    """R (D codes, K factors) -> weighted mean over code dims of 1 - H_K(row)."""
    D, K = R.shape
    if K < 2:
        return 1.0
    per_code = 1.0 - _entropy(R, K, axis=1)  # (D,)
    rho = R.sum(1) / max(R.sum(), 1e-12)
    return float((rho * per_code).sum())


def completeness(R: np.ndarray) -> float:
    """R (D codes, K factors) -> mean over factors of 1 - H_D(column)."""
    D, K = R.shape
    if D < 2:
        return 1.0
    return float((1.0 - _entropy(R, D, axis=0)).mean())


def importance_matrix(codes_train: np.ndarray, y_train: np.ndarray, codes_test: np.ndarray, y_test: np.ndarray, *,
                      method: str = "random_forest", n_estimators: int = 20, max_depth: int | None = 8,
                      lasso_c: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """-> R (D, K) with columns summing to 1 (0 where a factor got no importance), test accuracy (K,)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    mu, sd = codes_train.mean(0), codes_train.std(0) + 1e-8
    ztr, zte = (codes_train - mu) / sd, (codes_test - mu) / sd
    D, K = codes_train.shape[1], y_train.shape[1]
    R, acc = np.zeros((D, K)), np.zeros(K)
    for k in range(K):  # K is a handful of factors; each fit is vectorised inside sklearn
        if len(np.unique(y_train[:, k])) < 2:
            acc[k] = 1.0  # a constant factor: nothing to explain, no importance to assign
            continue
        if method == "random_forest":
            # every split sees every code dim: with random subsets an irrelevant dim is often the best
            # of those offered and collects importance that is not there
            est = RandomForestClassifier(n_estimators=n_estimators, max_features=None, max_depth=max_depth,
                                         min_samples_leaf=5, n_jobs=-1, random_state=seed)
            est.fit(ztr, y_train[:, k])
            imp = est.feature_importances_
        elif method == "lasso":
            est = LogisticRegression(l1_ratio=1.0, C=lasso_c, solver="saga", max_iter=500, random_state=seed)
            est.fit(ztr, y_train[:, k])
            imp = np.abs(est.coef_).sum(0)
        else:
            raise ValueError(f"dci: method must be 'random_forest' or 'lasso', got {method!r}")
        R[:, k] = imp / imp.sum() if imp.sum() > 0 else 0.0
        acc[k] = float((est.predict(zte) == y_test[:, k]).mean())
    return R, acc


def dci(codes_train, factors_train, codes_test, factors_test, *, factor_names: list[str] | None = None,
        method: str = "random_forest", bins: int = 10, n_estimators: int = 20, max_depth: int | None = 8,
        lasso_c: float = 0.1, seed: int = 0) -> dict:
    """DCI of codes (N, D) against factors (N, K); returns the three scores, per-factor detail and R."""
    codes_train, codes_test = np.asarray(codes_train, np.float64), np.asarray(codes_test, np.float64)
    factors_train, factors_test = np.asarray(factors_train), np.asarray(factors_test)
    if codes_train.ndim != 2 or codes_test.ndim != 2 or codes_train.shape[1] != codes_test.shape[1]:
        raise ValueError(f"dci: codes must be (N, D) with the same D, got {codes_train.shape} and {codes_test.shape}")
    if factors_train.ndim != 2 or len(factors_train) != len(codes_train) or len(factors_test) != len(codes_test):
        raise ValueError(f"dci: factors {factors_train.shape}/{factors_test.shape} do not match the codes' rows")
    if not (np.isfinite(codes_train).all() and np.isfinite(codes_test).all()):
        raise ValueError("dci: codes contain NaN or Inf (the encoder diverged)")
    names = factor_names or [f"factor_{k}" for k in range(factors_train.shape[1])]
    y_tr, y_te = discretize(factors_train, factors_test, bins)
    R, acc = importance_matrix(codes_train, y_tr, codes_test, y_te, method=method, n_estimators=n_estimators,
                               max_depth=max_depth, lasso_c=lasso_c, seed=seed)
    chance = [float(np.bincount(y_te[:, k]).max() / len(y_te)) for k in range(y_te.shape[1])]
    return {
        "disentanglement": disentanglement(R),
        "completeness": completeness(R),
        "informativeness": float(acc.mean()),
        "per_factor": {n: {"accuracy": float(a), "chance": c} for n, a, c in zip(names, acc, chance)},
        "code_dim": int(codes_train.shape[1]),
        "method": method,
        "importance": np.round(R, 4).tolist(),  # (D, K)
    }
