"""Disentanglement metrics with the disentanglement_lib protocols and defaults.

Every metric takes ``represent``, a function from factor classes (n, F) to representations
(n, K) -- the mean code of the image with those factors -- plus the factor sizes and a seed. On
dSprites ``represent`` looks the codes up in one encoding pass over the whole grid (an image
has a single mean representation), so no metric re-encodes anything; on synthetic data it can
be any function of the factors.

  factor_vae  Kim & Mnih (2018): majority-vote classifier predicting the fixed factor from the
              latent with the least normalised variance.
  mig         Chen et al. (2018): mutual information gap, normalised by factor entropy.
  beta_vae    Higgins et al. (2017): logistic regression predicting the fixed factor from the
              mean absolute difference of paired codes.
  dci         Eastwood & Williams (2018): disentanglement, completeness, informativeness from
              gradient-boosted trees' feature importances.
  sap         Kumar et al. (2018): separated attribute predictability with 1-D linear SVMs.

Unsupervised scores of the mean codes alone (disentanglement_lib's ``unsupervised_metrics``;
lower is more factorised, 0 for independent latents):

  gaussian_total_correlation            TC of a Gaussian with the codes' covariance C.
  gaussian_wasserstein_correlation      2 tr(C) - 2 tr(sqrtm(C diag(C))): the squared 2-Wasserstein
                                        distance between that Gaussian and its factorised one.
  gaussian_wasserstein_correlation_norm the same divided by tr(C).
  mutual_info_score                     mean discrete mutual information between two latents.

Ridgeway & Mozer (2018), disentanglement_lib's ``modularity_explicitness``:

  modularity    whether each latent carries information about one factor only: 1 - the rest of
                its squared mutual information over the top factor's, per latent, averaged.
  explicitness  how linearly decodable each factor is: ROC-AUC (one-vs-rest, on held-out
                points) of a logistic regression on the standardised codes, averaged.

  irs           Suter et al. (2019), disentanglement_lib's ``irs``: interventional robustness,
                how little a latent moves when the other factors change with its own held
                fixed, per latent at its best factor, weighted by the latent's range.
"""
import argparse

import numpy as np

from utils import did_you_mean

# New metrics go at the end: each metric's generator is seeded by its place in this tuple.
METRIC_NAMES = ("factor_vae", "mig", "beta_vae", "dci", "sap", "gaussian_total_correlation",
                "gaussian_wasserstein_correlation", "gaussian_wasserstein_correlation_norm",
                "mutual_info_score", "modularity", "explicitness", "irs")
DEFAULT_METRICS = ("factor_vae", "mig")
METRIC_LABELS = dict(factor_vae="FactorVAE score", mig="MIG", beta_vae="BetaVAE score",
                     dci="DCI disentanglement", sap="SAP score",
                     gaussian_total_correlation="Gaussian TC",
                     gaussian_wasserstein_correlation="Gaussian Wasserstein correlation",
                     gaussian_wasserstein_correlation_norm="Gaussian Wasserstein correlation "
                                                           "(normalised)",
                     mutual_info_score="mutual information score", modularity="modularity",
                     explicitness="explicitness", irs="IRS")

# Each protocol's parameters, disentanglement_lib's defaults: the one place they are written.
# ``evaluate`` passes them (with any overrides) to the metric functions, which have no defaults.
PROTOCOLS = {
    "factor_vae": dict(batch_size=64, num_variance_estimate=10000, num_train=10000,
                       num_eval=5000, prune_std=0.05),
    "mig": dict(num_train=10000, num_bins=20),
    "beta_vae": dict(batch_size=64, num_train=10000, num_eval=5000),
    "dci": dict(num_train=10000, num_test=5000),
    "sap": dict(num_train=10000, num_test=5000, svc_C=0.01, continuous_factors=False),
    "gaussian_total_correlation": dict(num_train=10000),
    "gaussian_wasserstein_correlation": dict(num_train=10000),
    "gaussian_wasserstein_correlation_norm": dict(num_train=10000),
    "mutual_info_score": dict(num_train=10000, num_bins=20),
    "modularity": dict(num_train=10000, num_bins=20),
    "explicitness": dict(num_train=10000, num_test=5000),
    "irs": dict(num_train=10000, num_bins=20, diff_quantile=0.99),
}


def sample_factors(factor_sizes, n, rng):
    """Uniform factor classes (n, F)."""
    return np.stack([rng.integers(0, size, n) for size in factor_sizes], axis=1)


def _sample_points(represent, factor_sizes, n, rng):
    factors = sample_factors(factor_sizes, n, rng)
    return factors, np.asarray(represent(factors), dtype=np.float64)


def factor_vae_score(represent, factor_sizes, rng, batch_size, num_variance_estimate, num_train,
                     num_eval, prune_std):
    _, codes = _sample_points(represent, factor_sizes, num_variance_estimate, rng)
    global_var = codes.var(axis=0, ddof=1)
    active = np.flatnonzero(np.sqrt(global_var) >= prune_std)
    # num_active: latents kept after pruning. num_active_dims is what disentanglement_lib
    # reports under that name: the length of its boolean mask, i.e. every latent.
    result = dict(num_active=int(len(active)), num_active_dims=int(len(global_var)))
    if not len(active):
        return dict(result, train_accuracy=0.0, eval_accuracy=0.0, score=0.0)

    def votes(n):
        """(F, len(active)) vote counts: fixed factor x latent of least normalised variance."""
        fixed = rng.integers(0, len(factor_sizes), n)  # n
        factors = sample_factors(factor_sizes, n * batch_size, rng).reshape(n, batch_size, -1)
        shared = sample_factors(factor_sizes, n, rng)[np.arange(n), fixed]  # n
        factors[np.arange(n), :, fixed] = shared[:, None]
        codes = np.asarray(represent(factors.reshape(n * batch_size, -1)), dtype=np.float64)
        local_var = codes.reshape(n, batch_size, -1).var(axis=1, ddof=1)  # n, K
        argmin = np.argmin(local_var[:, active] / global_var[active], axis=1)
        counts = np.zeros((len(factor_sizes), len(active)), dtype=np.int64)
        np.add.at(counts, (fixed, argmin), 1)
        return counts

    train = votes(num_train)
    classifier = train.argmax(axis=0)  # latent -> majority factor
    columns = np.arange(len(active))
    evaluation = votes(num_eval)
    return dict(result, train_accuracy=float(train[classifier, columns].sum() / train.sum()),
                eval_accuracy=float(evaluation[classifier, columns].sum() / evaluation.sum()),
                score=float(evaluation[classifier, columns].sum() / evaluation.sum()))


def _discretize(codes, num_bins):
    """Each latent into num_bins equal-width histogram bins (disentanglement_lib's)."""
    out = np.zeros(codes.shape, dtype=np.int64)
    for k in range(codes.shape[1]):
        edges = np.histogram(codes[:, k], num_bins)[1][:-1]
        out[:, k] = np.digitize(codes[:, k], edges)
    return out


def _code_factor_mi(discrete, factors):
    """(K, F) discrete mutual information (nats) of each discretised latent with each factor."""
    from sklearn.metrics import mutual_info_score

    return np.array([[mutual_info_score(factors[:, f], discrete[:, k])
                      for f in range(factors.shape[1])] for k in range(discrete.shape[1])])


def mig(represent, factor_sizes, rng, num_train, num_bins):
    from sklearn.metrics import mutual_info_score

    factors, codes = _sample_points(represent, factor_sizes, num_train, rng)
    discrete = _discretize(codes, num_bins)
    mi = _code_factor_mi(discrete, factors)  # K, F
    entropy = np.array([mutual_info_score(factors[:, f], factors[:, f])
                        for f in range(factors.shape[1])])
    top = np.sort(mi, axis=0)[::-1]
    gaps = (top[0] - top[1]) / entropy if codes.shape[1] > 1 else top[0] / entropy
    return dict(score=float(gaps.mean()), per_factor=gaps.tolist())


def beta_vae_score(represent, factor_sizes, rng, batch_size, num_train, num_eval):
    from sklearn.linear_model import LogisticRegression

    def points(n):
        fixed = rng.integers(0, len(factor_sizes), n)
        first = sample_factors(factor_sizes, n * batch_size, rng).reshape(n, batch_size, -1)
        second = sample_factors(factor_sizes, n * batch_size, rng).reshape(n, batch_size, -1)
        rows = np.arange(n)
        second[rows, :, fixed] = first[rows, :, fixed]
        z1 = np.asarray(represent(first.reshape(n * batch_size, -1)), dtype=np.float64)
        z2 = np.asarray(represent(second.reshape(n * batch_size, -1)), dtype=np.float64)
        features = np.abs(z1 - z2).reshape(n, batch_size, -1).mean(axis=1)
        return features, fixed

    x_train, y_train = points(num_train)
    x_eval, y_eval = points(num_eval)
    model = LogisticRegression(random_state=int(rng.integers(2 ** 31)))
    model.fit(x_train, y_train)
    return dict(train_accuracy=float(model.score(x_train, y_train)),
                eval_accuracy=float(model.score(x_eval, y_eval)),
                score=float(model.score(x_eval, y_eval)))


def _entropy(p, base):
    p = p / p.sum(axis=0, keepdims=True)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=0) / np.log(base)


def dci(represent, factor_sizes, rng, num_train, num_test, n_jobs=-1):
    from joblib import Parallel, delayed
    from sklearn.ensemble import GradientBoostingClassifier

    factors, codes = _sample_points(represent, factor_sizes, num_train, rng)
    test_factors, test_codes = _sample_points(represent, factor_sizes, num_test, rng)
    n_codes, n_factors = codes.shape[1], factors.shape[1]
    seeds = rng.integers(2 ** 31, size=n_factors)

    def fit(f):
        model = GradientBoostingClassifier(random_state=int(seeds[f]))
        model.fit(codes, factors[:, f])
        return (np.abs(model.feature_importances_), model.score(codes, factors[:, f]),
                model.score(test_codes, test_factors[:, f]))

    # One boosted model per factor, factors with the most classes first, on every core: the
    # 40-class orientation alone fits 4,000 trees.
    order = np.argsort(factor_sizes)[::-1]
    fitted = dict(zip(order, Parallel(n_jobs=n_jobs)(delayed(fit)(f) for f in order), strict=True))
    importance = np.stack([fitted[f][0] for f in range(n_factors)], axis=1)  # K, F
    train_acc = [fitted[f][1] for f in range(n_factors)]
    test_acc = [fitted[f][2] for f in range(n_factors)]
    total = importance.sum()
    if total == 0:  # a constant representation: no tree uses any code
        disentanglement = completeness = 0.0
    else:
        eps = 1e-11  # as disentanglement_lib: keeps all-zero rows finite
        per_code = 1 - _entropy(importance.T + eps, n_factors)  # K
        per_factor = 1 - _entropy(importance + eps, n_codes) if n_codes > 1 else np.ones(n_factors)
        disentanglement = float((per_code * importance.sum(1) / total).sum())
        completeness = float((per_factor * importance.sum(0) / total).sum())
    return dict(disentanglement=disentanglement, completeness=completeness,
                informativeness_train=float(np.mean(train_acc)),
                informativeness_test=float(np.mean(test_acc)),
                score=disentanglement)


def sap(represent, factor_sizes, rng, num_train, num_test, svc_C, continuous_factors):
    """Discrete factors (the default): test accuracy of a LinearSVC on each single latent;
    continuous factors: squared correlation of each latent with each factor. As in
    disentanglement_lib, a constant latent is fitted like any other (its classifier scores
    about chance), so it can be the runner-up that sets a factor's gap."""
    from sklearn.svm import LinearSVC

    factors, codes = _sample_points(represent, factor_sizes, num_train, rng)
    test_factors, test_codes = _sample_points(represent, factor_sizes, num_test, rng)
    scores = np.zeros((codes.shape[1], factors.shape[1]))
    for k in range(codes.shape[1]):
        for f in range(factors.shape[1]):
            if continuous_factors:
                cov = np.cov(codes[:, k], factors[:, f], ddof=1)
                # as disentanglement_lib: 0 for a (near-)constant latent
                scores[k, f] = cov[0, 1] ** 2 / (cov[0, 0] * cov[1, 1]) if cov[0, 0] > 1e-12 else 0.0
                continue
            model = LinearSVC(C=svc_C, class_weight="balanced",
                              random_state=int(rng.integers(2 ** 31)))
            model.fit(codes[:, k:k + 1], factors[:, f])
            scores[k, f] = model.score(test_codes[:, k:k + 1], test_factors[:, f])
    top = np.sort(scores, axis=0)[::-1]
    gaps = top[0] - top[1] if codes.shape[1] > 1 else top[0]
    return dict(score=float(gaps.mean()), per_factor=gaps.tolist(), accuracy=scores.tolist())


def _code_covariance(represent, factor_sizes, rng, num_train):
    """The covariance of ``num_train`` mean codes of uniformly drawn factors, over the latents
    that vary: a constant latent is independent of the others and adds 0 to every unsupervised
    score (the limit as its variance goes to 0), so it is left out."""
    codes = _sample_points(represent, factor_sizes, num_train, rng)[1]
    cov = np.atleast_2d(np.cov(codes, rowvar=False))
    varying = np.flatnonzero(np.diag(cov) > 0)
    return cov[np.ix_(varying, varying)]


def gaussian_total_correlation(represent, factor_sizes, rng, num_train):
    """0.5 (sum log diag C - log det C) over the varying latents; a latent that is an exact
    linear function of others makes C singular: TC is infinite."""
    cov = _code_covariance(represent, factor_sizes, rng, num_train)
    sign, logdet = np.linalg.slogdet(cov)
    tc = 0.5 * (np.log(np.diag(cov)).sum() - logdet) if sign > 0 else np.inf
    return dict(score=float(tc), num_varying=len(cov))


def _wasserstein_correlation(cov):
    from scipy.linalg import sqrtm

    if not len(cov):
        return 0.0
    root = sqrtm(cov * np.diag(cov)[:, None])
    return float(2 * np.trace(cov) - 2 * np.trace(root).real)


def gaussian_wasserstein_correlation(represent, factor_sizes, rng, num_train):
    """2 tr(C) - 2 tr(sqrtm(C * diag(C)[:, None]))."""
    cov = _code_covariance(represent, factor_sizes, rng, num_train)
    return dict(score=_wasserstein_correlation(cov))


def gaussian_wasserstein_correlation_norm(represent, factor_sizes, rng, num_train):
    """The Wasserstein correlation divided by tr(C) (0 for codes that never vary)."""
    cov = _code_covariance(represent, factor_sizes, rng, num_train)
    total = float(np.trace(cov))
    return dict(score=_wasserstein_correlation(cov) / total if total > 0 else 0.0)


def mutual_info_score(represent, factor_sizes, rng, num_train, num_bins):
    """Mean mutual information (nats) between two different latents, each discretised into
    ``num_bins`` equal-width bins as MIG's."""
    from sklearn.metrics import mutual_info_score as discrete_mi

    discrete = _discretize(_sample_points(represent, factor_sizes, num_train, rng)[1], num_bins)
    k = discrete.shape[1]
    if k < 2:
        return dict(score=0.0)
    pairs = [discrete_mi(discrete[:, i], discrete[:, j]) for i in range(k) for j in range(i + 1, k)]
    return dict(score=float(2 * sum(pairs) / (k * k - k)))


def modularity_of(mi):
    """Ridgeway & Mozer's modularity of a (K, F) mutual-information matrix: per latent,
    1 - (sum of squared MI over factors - the largest) / (largest x (F - 1)); 0 for a latent
    with no information; the mean over latents. NaN with a single factor (F - 1 = 0), as
    disentanglement_lib's."""
    squared = np.square(mi)
    top = squared.max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_latent = 1.0 - (squared.sum(axis=1) - top) / (top * (squared.shape[1] - 1.0))
    per_latent[top == 0.0] = 0.0
    return per_latent


def modularity(represent, factor_sizes, rng, num_train, num_bins):
    factors, codes = _sample_points(represent, factor_sizes, num_train, rng)
    per_latent = modularity_of(_code_factor_mi(_discretize(codes, num_bins), factors))
    return dict(score=float(per_latent.mean()), per_latent=per_latent.tolist())


def standardise(codes, mean=None, std=None):
    """(codes - mean) / std per latent (std with ddof 0), mean and std from ``codes`` unless
    given. A latent of std 0 is divided by 1 instead: disentanglement_lib divides by 0 there and
    its classifier then fails on the NaN; this is the one departure."""
    mean = codes.mean(axis=0) if mean is None else mean
    std = codes.std(axis=0) if std is None else std
    return (codes - mean) / np.where(std > 0, std, 1.0), mean, std


def explicitness_of(train_codes, train_factor, test_codes, test_factor):
    """(train, test) ROC-AUC of a default LogisticRegression predicting one factor from the
    (standardised) codes: predicted probabilities against the one-hot classes present,
    macro-averaged over classes, as disentanglement_lib's ``explicitness_per_factor``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    classifier = LogisticRegression().fit(train_codes, train_factor)

    def auc(codes, factor):
        one_hot = (factor[:, None] == np.unique(factor)[None, :]).astype(np.int64)
        return roc_auc_score(one_hot, classifier.predict_proba(codes))
    return auc(train_codes, train_factor), auc(test_codes, test_factor)


def explicitness(represent, factor_sizes, rng, num_train, num_test):
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    factors, codes = _sample_points(represent, factor_sizes, num_train, rng)
    test_factors, test_codes = _sample_points(represent, factor_sizes, num_test, rng)
    train_x, mean, std = standardise(codes)
    test_x = standardise(test_codes, mean, std)[0]
    with warnings.catch_warnings():  # lbfgs's default 100 iterations, as disentanglement_lib's
        warnings.simplefilter("ignore", ConvergenceWarning)
        aucs = np.array([explicitness_of(train_x, factors[:, f], test_x, test_factors[:, f])
                         for f in range(factors.shape[1])])  # F, 2
    return dict(score=float(aucs[:, 1].mean()), explicitness_train=float(aucs[:, 0].mean()),
                explicitness_test=float(aucs[:, 1].mean()), per_factor=aucs[:, 1].tolist())


def irs_of(factors, latents, diff_quantile):
    """Suter et al.'s IRS of (N, F) discretised factors and (N, K) latents (none constant):
    per factor value, the ``diff_quantile`` quantile of each latent's distance to its mean
    given that value, averaged over the values, over the latent's largest deviation from its
    mean; 1 - that, at the best factor per latent; the mean over latents weighted by their
    largest deviation. Returns (score, per-latent scores, per-latent best factor). The latents
    are laid out as disentanglement_lib's (a transposed (K, N) array: each latent's points
    contiguous), so that numpy sums them in the same order, to the last bit."""
    latents = np.asfortranarray(latents)
    max_deviations = np.max(np.abs(latents - latents.mean(axis=0)), axis=0)  # K
    deviations = np.zeros((latents.shape[1], factors.shape[1]))  # K, F
    for f in range(factors.shape[1]):
        values = np.unique(factors[:, f])
        for value in values:
            match = factors[:, f] == value
            given = latents[match, :]
            deviations[:, f] += np.quantile(np.abs(given - given.mean(axis=0)), q=diff_quantile,
                                            axis=0)
        deviations[:, f] /= len(values)
    irs_matrix = 1.0 - deviations / max_deviations[:, None]
    per_latent = irs_matrix.max(axis=1)
    score = (np.average(per_latent, weights=max_deviations) if max_deviations.sum() > 0
             else per_latent.mean())
    return float(score), per_latent, irs_matrix.argmax(axis=1)


def irs(represent, factor_sizes, rng, num_train, num_bins, diff_quantile):
    """The factors binned as the codes are for MIG (20 equal-width bins: x and y's 32 values
    share bins), constant latents dropped; 0 when every latent is constant. ``num_active`` is
    the count of latents kept (disentanglement_lib's ``num_active_dims`` sums their values
    instead, so it is not reported)."""
    factors, codes = _sample_points(represent, factor_sizes, num_train, rng)
    active = codes[:, codes.var(axis=0) > 0]
    if not active.any():
        return dict(score=0.0, num_active=int(active.shape[1]))
    score, per_latent, parents = irs_of(_discretize(factors, num_bins), active, diff_quantile)
    return dict(score=score, num_active=int(active.shape[1]), per_latent=per_latent.tolist(),
                parents=parents.tolist())


# UDR (Duan et al. 2020), disentanglement_lib's ``udr_sklearn`` defaults: not one model's score
# but each model's among the seeds of its configuration, from their mean codes of the same points
UDR_PROTOCOL = dict(num_data_points=1000, alpha=0.1, kl_filter_threshold=0.01)


def relative_strength(matrix):
    """disentanglement_lib's ``relative_strength_disentanglement``: the mean over columns of
    max^2 / sum and the same over rows, averaged (0 for an empty row or column)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        columns = np.nan_to_num(np.square(matrix.max(axis=0)) / matrix.sum(axis=0))
        rows = np.nan_to_num(np.square(matrix.max(axis=1)) / matrix.sum(axis=1))
    return (np.nanmean(columns) + np.nanmean(rows)) / 2


def udr(codes, kls, alpha, kl_filter_threshold):
    """UDR of N models from their mean codes of the same points, ``codes`` [(P, K)], and
    their mean KL per latent, ``kls`` [(K,)]: each model's codes standardised (sklearn's
    StandardScaler) and its latents of KL <= 0.01 zeroed; for each ordered pair (i, j) the
    |coefficients| of a Lasso (``alpha``) regressing j's codes on i's, restricted to both
    models' latents of KL > ``kl_filter_threshold``, scored by ``relative_strength``. A model's
    UDR is the median of the pairs that regress onto it. Returns (per-model scores, (N, N)
    pairwise matrix, 0 on the diagonal)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso
    from sklearn.preprocessing import StandardScaler

    n = len(codes)
    if n < 2:
        raise ValueError("UDR compares models: give the codes of at least two")
    scaled = [StandardScaler().fit_transform(c) * np.greater(kl, 0.01)
              for c, kl in zip(codes, kls, strict=True)]
    keep = [np.asarray(kl) > kl_filter_threshold for kl in kls]
    pairwise = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    model = Lasso(alpha=alpha).fit(scaled[i], scaled[j])
                matrix = np.transpose(np.absolute(model.coef_))[keep[i], ...][..., keep[j]]
                # no latent above the threshold in either (a collapsed model): 0, where
                # disentanglement_lib fails on the empty matrix
                pairwise[i, j] = relative_strength(matrix) if matrix.size else 0.0
    scores = [float(np.median(np.delete(pairwise[:, i], i))) for i in range(n)]
    return scores, pairwise


METRICS = {"factor_vae": factor_vae_score, "mig": mig, "beta_vae": beta_vae_score, "dci": dci,
           "sap": sap, "gaussian_total_correlation": gaussian_total_correlation,
           "gaussian_wasserstein_correlation": gaussian_wasserstein_correlation,
           "gaussian_wasserstein_correlation_norm": gaussian_wasserstein_correlation_norm,
           "mutual_info_score": mutual_info_score, "modularity": modularity,
           "explicitness": explicitness, "irs": irs}


EVAL_SEED = 0  # one fixed seed for every evaluation, so that runs are scored on the same samples


def evaluate(represent, factor_sizes, names=DEFAULT_METRICS, seed=EVAL_SEED, overrides=None):
    """Scores of the named metrics, each with its own generator seeded from ``seed`` (so one
    metric's result does not depend on which others ran). ``overrides``: {name: {parameter:
    value}} departures from PROTOCOLS. Returns {name: result dict with its "protocol"}."""
    unknown = set(names) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRIC_NAMES}")
    results = {}
    for i, name in enumerate(METRIC_NAMES):
        if name in names:
            rng = np.random.default_rng([seed, i])
            protocol = {**PROTOCOLS[name], **(overrides or {}).get(name, {})}
            results[name] = dict(METRICS[name](represent, factor_sizes, rng, **protocol),
                                 protocol=protocol)
    return results


def score_note(name, result):
    """Why a score is exactly 0 or not finite, in words for a summary (None for any other
    score): a table that prints a bare 0 or inf reads as a measurement of disentanglement."""
    score = result.get("score")
    if score is None:
        return None
    if name == "factor_vae" and result.get("num_active") == 0:
        return (f"0 by definition: no latent's standard deviation reaches prune_std "
                f"{result.get('protocol', {}).get('prune_std', PROTOCOLS[name]['prune_std'])} "
                f"over the variance sample (every latent collapsed to the prior)")
    if np.isnan(score):
        return "undefined (NaN): the codes gave no finite statistic"
    if np.isinf(score):
        return ("infinite: the codes' covariance is singular (a latent is an exact linear "
                "function of others)" if name == "gaussian_total_correlation" else
                "infinite: the codes gave no finite statistic")
    if score == 0:
        return ("exactly 0: for every factor the two most informative latents tie (e.g. "
                "constant codes, every latent in one histogram bin)" if name == "mig" else
                "exactly 0 (e.g. codes that do not vary: nothing to measure)")
    return None


def lookup(codes, factor_sizes):
    """``represent`` for codes of a complete factor grid stored in dataset (C) order."""
    codes = np.asarray(codes)

    def represent(factors):
        return codes[np.ravel_multi_index(np.asarray(factors).T, factor_sizes)]
    return represent


def metric_list(text):
    """argparse type of ``--eval-metrics``: comma-separated names, ``all`` or ``none`` ->
    the names in METRIC_NAMES order, comma-separated ("" for none)."""
    if text == "all":
        return ",".join(METRIC_NAMES)
    if text == "none":
        return ""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown:
        hint = did_you_mean(unknown[0], (*METRIC_NAMES, "all", "none"))
        raise argparse.ArgumentTypeError(f"unknown metric(s) {', '.join(unknown)}{hint} (choose "
                                         f"from {', '.join(METRIC_NAMES)}, all or none)")
    return ",".join(n for n in METRIC_NAMES if n in names)
