"""Modularity, explicitness, IRS and UDR checked bit for bit against literal ports of
disentanglement_lib's functions (``evaluation/metrics/modularity_explicitness.py``, ``irs.py``,
``udr/metrics/udr.py`` and the helpers of ``utils.py`` they call, in their own shapes: codes and factors as
(num_codes, num_points)), on fixed arrays."""
import numpy as np
import pytest
import sklearn.metrics
from sklearn.linear_model import Lasso, LogisticRegression
from sklearn.preprocessing import MultiLabelBinarizer, StandardScaler

from metrics import (_code_factor_mi, _discretize, explicitness_of, irs, irs_of, lookup,
                     modularity_of, standardise, udr)


# --- the ports: disentanglement_lib's code paths, transcribed ---------------------------------

def dl_histogram_discretize(target, num_bins):
    discretized = np.zeros_like(target)
    for i in range(target.shape[0]):
        discretized[i, :] = np.digitize(target[i, :], np.histogram(target[i, :], num_bins)[1][:-1])
    return discretized


def dl_discrete_mutual_info(mus, ys):
    m = np.zeros([mus.shape[0], ys.shape[0]])
    for i in range(mus.shape[0]):
        for j in range(ys.shape[0]):
            m[i, j] = sklearn.metrics.mutual_info_score(ys[j, :], mus[i, :])
    return m


def dl_modularity(mutual_information):
    squared_mi = np.square(mutual_information)
    max_squared_mi = np.max(squared_mi, axis=1)
    numerator = np.sum(squared_mi, axis=1) - max_squared_mi
    denominator = max_squared_mi * (squared_mi.shape[1] - 1.)
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = numerator / denominator
    modularity_score = 1. - delta
    modularity_score[max_squared_mi == 0.] = 0.
    return np.mean(modularity_score)


def dl_normalize_data(data, mean=None, stddev=None):
    if mean is None:
        mean = np.mean(data, axis=1)
    if stddev is None:
        stddev = np.std(data, axis=1)
    return (data - mean[:, np.newaxis]) / stddev[:, np.newaxis], mean, stddev


def dl_explicitness_per_factor(mus_train, y_train, mus_test, y_test):
    x_train, x_test = np.transpose(mus_train), np.transpose(mus_test)
    clf = LogisticRegression().fit(x_train, y_train)
    mlb = MultiLabelBinarizer()
    roc_train = sklearn.metrics.roc_auc_score(mlb.fit_transform(np.expand_dims(y_train, 1)),
                                              clf.predict_proba(x_train))
    roc_test = sklearn.metrics.roc_auc_score(mlb.fit_transform(np.expand_dims(y_test, 1)),
                                             clf.predict_proba(x_test))
    return roc_train, roc_test


def dl_drop_constant_dims(ys):
    return ys[ys.var(axis=1) > 0., :]


def dl_scalable_disentanglement_score(gen_factors, latents, diff_quantile=0.99):
    num_gen, num_lat = gen_factors.shape[1], latents.shape[1]
    max_deviations = np.max(np.abs(latents - latents.mean(axis=0)), axis=0)
    cum_deviations = np.zeros([num_lat, num_gen])
    for i in range(num_gen):
        unique_factors = np.unique(gen_factors[:, i], axis=0)
        num_distinct_factors = unique_factors.shape[0]
        for k in range(num_distinct_factors):
            match = gen_factors[:, i] == unique_factors[k]
            e_loc = np.mean(latents[match, :], axis=0)
            diffs = np.abs(latents[match, :] - e_loc)
            cum_deviations[:, i] += np.quantile(diffs, q=diff_quantile, axis=0)
        cum_deviations[:, i] /= num_distinct_factors
    irs_matrix = 1.0 - cum_deviations / max_deviations[:, np.newaxis]
    disentanglement_scores = irs_matrix.max(axis=1)
    if np.sum(max_deviations) > 0.0:
        avg_score = np.average(disentanglement_scores, weights=max_deviations)
    else:
        avg_score = np.mean(disentanglement_scores)
    return dict(disentanglement_scores=disentanglement_scores, avg_score=avg_score,
                parents=irs_matrix.argmax(axis=1))


def dl_compute_irs(mus, ys, diff_quantile, num_bins):
    ys_discrete = dl_histogram_discretize(ys, num_bins)
    active_mus = dl_drop_constant_dims(mus)
    if not active_mus.any():
        return 0.0
    return dl_scalable_disentanglement_score(ys_discrete.T, active_mus.T, diff_quantile)[
        "avg_score"]


def dl_relative_strength_disentanglement(corr_matrix):
    score_x = np.nanmean(np.nan_to_num(np.power(np.ndarray.max(corr_matrix, axis=0), 2)
                                       / np.sum(corr_matrix, axis=0), 0))
    score_y = np.nanmean(np.nan_to_num(np.power(np.ndarray.max(corr_matrix, axis=1), 2)
                                       / np.sum(corr_matrix, axis=1), 0))
    return (score_x + score_y) / 2


def dl_lasso_correlation_matrix(vec1, vec2, random_state=None):
    model = Lasso(random_state=random_state, alpha=0.1)
    model.fit(vec1, vec2)
    return np.transpose(np.absolute(model.coef_))


def dl_udr_from_representations(inferred_model_reps, kl, kl_filter_threshold=0.01):
    """compute_udr_sklearn after its sampling: lasso, filter_low_kl."""
    num_models = len(inferred_model_reps)
    kl_mask = []
    for i in range(num_models):
        scaler = StandardScaler()
        scaler.fit(inferred_model_reps[i])
        inferred_model_reps[i] = scaler.transform(inferred_model_reps[i])
        inferred_model_reps[i] = inferred_model_reps[i] * np.greater(kl[i], 0.01)
        kl_mask.append(kl[i] > kl_filter_threshold)
    disentanglement = np.zeros((num_models, num_models, 1))
    for i in range(num_models):
        for j in range(num_models):
            if i == j:
                continue
            corr_matrix = dl_lasso_correlation_matrix(inferred_model_reps[i],
                                                      inferred_model_reps[j], 0)
            corr_matrix = corr_matrix[kl_mask[i], ...][..., kl_mask[j]]
            disentanglement[i, j] = dl_relative_strength_disentanglement(corr_matrix)
    return [np.median(np.delete(disentanglement[:, i], i)) for i in range(num_models)], \
        disentanglement


# --- fixed arrays: codes that carry the factors in part, mixed and with noise ------------------

def fixed_points(n, seed):
    rng = np.random.default_rng(seed)
    factors = np.stack([rng.integers(0, k, n) for k in (3, 6, 10)], axis=1)  # n, F
    mix = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.3], [0.0, 0.2, 1.0], [0.5, 0.5, 0.0],
                    [0.0, 0.0, 0.0], [0.1, 0.0, 0.0]])  # K, F: one pure, two mixed, one empty
    codes = factors @ mix.T + rng.normal(scale=0.3, size=(n, len(mix)))
    return codes, factors


@pytest.fixture(scope="module")
def points():
    return fixed_points(2000, 0), fixed_points(1000, 1)


def test_modularity_equals_disentanglement_libs_bit_for_bit(points):
    (codes, factors), _ = points
    discrete = _discretize(codes, 20)
    assert np.array_equal(discrete, dl_histogram_discretize(codes.T, 20).T)
    mi = _code_factor_mi(discrete, factors)
    reference = dl_discrete_mutual_info(dl_histogram_discretize(codes.T, 20), factors.T)
    assert np.array_equal(mi, reference)
    assert modularity_of(mi).mean() == dl_modularity(reference)
    assert 0.3 < modularity_of(mi).mean() < 0.95  # neither end: a test that can fail


def test_explicitness_equals_disentanglement_libs_bit_for_bit(points):
    (codes, factors), (test_codes, test_factors) = points
    train_x, mean, std = standardise(codes)
    test_x = standardise(test_codes, mean, std)[0]
    dl_train, dl_mean, dl_std = dl_normalize_data(codes.T)
    dl_test = dl_normalize_data(test_codes.T, dl_mean, dl_std)[0]
    assert np.array_equal(train_x, dl_train.T) and np.array_equal(test_x, dl_test.T)
    for f in range(factors.shape[1]):
        ours = explicitness_of(train_x, factors[:, f], test_x, test_factors[:, f])
        theirs = dl_explicitness_per_factor(dl_train, factors[:, f], dl_test, test_factors[:, f])
        assert ours == theirs, f
        assert 0.5 < ours[1] < 1.0


def test_a_constant_latent_is_standardised_to_zero_where_disentanglement_lib_divides_by_zero():
    codes = np.column_stack([np.arange(10.0), np.full(10, 3.0)])
    standardised = standardise(codes)[0]
    assert np.all(standardised[:, 1] == 0) and np.isfinite(standardised).all()
    with np.errstate(invalid="ignore"):
        assert np.isnan(dl_normalize_data(codes.T)[0][1]).all()  # the case it cannot score


def test_irs_equals_disentanglement_libs_bit_for_bit(points):
    (codes, factors), _ = points
    codes = np.column_stack([codes, np.full(len(codes), 2.5)])  # a constant latent, dropped
    wide = np.column_stack([factors, np.random.default_rng(2).integers(0, 32, len(factors))])
    for diff_quantile in (0.99, 1.0):
        expected = dl_compute_irs(codes.T, wide.T, diff_quantile, 20)
        score, per_latent, parents = irs_of(_discretize(wide, 20), codes[:, :-1], diff_quantile)
        reference = dl_scalable_disentanglement_score(  # as compute_irs calls it
            dl_histogram_discretize(wide.T, 20).T, dl_drop_constant_dims(codes.T).T,
            diff_quantile)
        assert score == expected == reference["avg_score"]
        assert np.array_equal(per_latent, reference["disentanglement_scores"])
        assert np.array_equal(parents, reference["parents"])
        assert 0.1 < score < 0.9
    # through the metric: the points it samples, scored as disentanglement_lib would score them
    sizes = (3, 6, 10, 32)
    grid = np.stack(np.meshgrid(*[np.arange(k) for k in sizes], indexing="ij"), -1).reshape(
        -1, 4)
    table = grid @ np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.3, 0.0], [0.0, 0.0, 0.0, 0.2],
                             [0.0, 0.0, 0.0, 0.0]]).T
    table += np.random.default_rng(3).normal(scale=0.3, size=table.shape) * [1, 1, 1, 0]
    represent = lookup(table, sizes)
    result = irs(represent, sizes, np.random.default_rng(7), num_train=3000, num_bins=20,
                 diff_quantile=0.99)
    rng = np.random.default_rng(7)
    sampled = np.stack([rng.integers(0, k, 3000) for k in sizes], axis=1)
    assert result["score"] == dl_compute_irs(represent(sampled).T, sampled.T, 0.99, 20)
    assert result["num_active"] == 3


def test_udr_equals_disentanglement_libs_bit_for_bit():
    """Four models of six latents on the same 1,000 points: two that carry the same three
    sources in other orders and signs, one that mixes them, one with a latent of low KL and a
    constant one (filtered and zeroed as disentanglement_lib does)."""
    import warnings
    rng = np.random.default_rng(5)
    sources = rng.normal(size=(1000, 3))
    noise = lambda: rng.normal(scale=0.1, size=(1000, 6))  # noqa: E731
    pad = np.zeros((1000, 3))
    codes = [np.hstack([sources, pad]) + noise(),
             np.hstack([-sources[:, [2, 0, 1]], pad]) + noise(),
             np.hstack([sources @ rng.normal(size=(3, 3)), pad]) + noise(),
             np.hstack([sources[:, :2], np.full((1000, 1), 4.0), pad]) + noise() * [1, 1, 0, 1, 1,
                                                                                   1]]
    kls = [np.array([2.0, 1.5, 1.0, 0.001, 0.002, 0.0]), np.array([1.0, 2.0, 1.5, 0.0, 0.0, 0.0]),
           np.array([1.2, 1.1, 1.3, 0.005, 0.0, 0.0]), np.array([1.0, 1.0, 0.005, 0.0, 0.0, 0.0])]
    scores, pairwise = udr(codes, kls, alpha=0.1, kl_filter_threshold=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected, reference = dl_udr_from_representations([c.copy() for c in codes], kls)
    assert scores == [float(e) for e in expected]
    assert np.array_equal(pairwise, reference[:, :, 0])
    assert scores[1] > scores[2]  # the permuted copy agrees with the others more than the mix
    assert 0 < min(scores) and max(scores) < 1
