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


# ---------------------------------------------------------------- intervals over test objects
def permutation_contributions(codes_train, y_train, codes_test, y_test, *, n_estimators: int = 20,
                              max_depth: int | None = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per test row: correct (N, K) and the drop when one code dim is permuted, drop (D, N, K).

    A random forest per factor is fit on the training codes once; the importance of dim i for factor k is
    the mean over test rows of drop[i, :, k] (permutation importance). Both are per-row, so a bootstrap over
    test objects re-averages rows and never refits.
    """
    from sklearn.ensemble import RandomForestClassifier

    mu, sd = codes_train.mean(0), codes_train.std(0) + 1e-8
    ztr, zte = (codes_train - mu) / sd, (codes_test - mu) / sd
    D, K, N = ztr.shape[1], y_train.shape[1], len(zte)
    perm = np.random.default_rng(seed).permutation(N)
    correct, drop = np.ones((N, K)), np.zeros((D, N, K))
    for k in range(K):
        if len(np.unique(y_train[:, k])) < 2:
            continue  # a constant factor: always right, nothing to attribute
        est = RandomForestClassifier(n_estimators=n_estimators, max_features=None, max_depth=max_depth,
                                     min_samples_leaf=5, n_jobs=-1, random_state=seed).fit(ztr, y_train[:, k])
        correct[:, k] = est.predict(zte) == y_test[:, k]
        step = max(1, 4_000_000 // (N * D))  # code dims per chunk: (step, N, D) float64 stays ~32 MB
        for i0 in range(0, D, step):
            dims = np.arange(i0, min(D, i0 + step))
            shuffled = np.repeat(zte[None], len(dims), 0)  # copy j has dim dims[j] permuted
            shuffled[np.arange(len(dims)), :, dims] = zte[perm][:, dims].T
            pred = est.predict(shuffled.reshape(-1, D)).reshape(len(dims), N)
            drop[dims, :, k] = correct[None, :, k] - (pred == y_test[None, :, k])
    return correct, drop


def _scores(correct: np.ndarray, drop: np.ndarray, rows: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    R = np.clip(drop[:, rows].mean(1), 0.0, None)  # (D, K)
    R = R / np.clip(R.sum(0, keepdims=True), 1e-12, None)
    return disentanglement(R), completeness(R), float(correct[rows].mean()), R


def dci_intervals(codes: dict[str, tuple[np.ndarray, np.ndarray]], factors_train, factors_test, groups_test, *,
                  bins: int = 10, n_estimators: int = 20, max_depth: int | None = 8, resamples: int = 1000,
                  seed: int = 0, against: str | None = None, factor_names: list[str] | None = None) -> dict:
    """DCI (permutation importance) of each named code (train, test), bootstrap intervals over test objects.

    groups_test (N,): the object of each test row; a resample draws objects, so an object's views stay
    together. Every code shares the resampled objects, so `against` (a code name) gets paired differences
    (interval and two-sided bootstrap p) against every other code.
    """
    y_tr, y_te = discretize(np.asarray(factors_train), np.asarray(factors_test), bins)
    objs, inv = np.unique(np.asarray(groups_test), return_inverse=True)
    members = [np.flatnonzero(inv == o) for o in range(len(objs))]
    rng = np.random.default_rng(seed)
    draws = [np.concatenate([members[o] for o in rng.integers(0, len(objs), len(objs))]) for _ in range(resamples)]
    every = np.arange(len(inv))
    out, boot = {}, {}
    for name, (tr, te) in codes.items():
        tr, te = np.asarray(tr, np.float64), np.asarray(te, np.float64)
        if not (np.isfinite(tr).all() and np.isfinite(te).all()):
            raise ValueError(f"dci: code {name!r} contains NaN or Inf (the encoder diverged)")
        correct, drop = permutation_contributions(tr, y_tr, te, y_te, n_estimators=n_estimators,
                                                  max_depth=max_depth, seed=seed)
        d, c, i, R = _scores(correct, drop, every)
        boot[name] = np.array([_scores(correct, drop, rows)[:3] for rows in draws])  # (B, 3)
        out[name] = {"disentanglement": d, "completeness": c, "informativeness": i, "code_dim": int(tr.shape[1]),
                     "importance": np.round(R, 4).tolist(),
                     "per_factor_accuracy": dict(zip(factor_names or range(R.shape[1]), correct.mean(0).tolist()))}
        for j, key in enumerate(("disentanglement", "completeness", "informativeness")):
            out[name][f"{key}_ci95"] = np.quantile(boot[name][:, j], [0.025, 0.975]).tolist()
    paired = []
    for other in (n for n in codes if against and n != against):
        for j, key in enumerate(("disentanglement", "completeness", "informativeness")):
            diff = boot[against][:, j] - boot[other][:, j]
            p = min(1.0, 2 * min((diff <= 0).mean(), (diff >= 0).mean()) + 1 / resamples)
            paired.append({"a": against, "b": other, "metric": key, "p_value": float(p),
                           "diff": out[against][key] - out[other][key],
                           "diff_ci95": np.quantile(diff, [0.025, 0.975]).tolist()})
    return {"codes": out, "paired": paired, "factor_names": factor_names, "n_test_objects": int(len(objs)),
            "importance": "permutation (test rows), random forest per factor fit on train",
            "test": f"paired bootstrap over test objects ({resamples} draws)"}
