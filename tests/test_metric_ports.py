"""Modularity and explicitness checked bit for bit against literal ports of disentanglement_lib's
functions (``evaluation/metrics/modularity_explicitness.py`` and the helpers of ``utils.py`` it
calls, in their own shapes: codes and factors as (num_codes, num_points)), on fixed arrays."""
import numpy as np
import pytest
import sklearn.metrics
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import MultiLabelBinarizer

from metrics import (_code_factor_mi, _discretize, explicitness_of, modularity_of,
                     standardise)


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
