"""Metric sanity checks from disentanglement_lib's own expectations, on synthetic factors."""
import math

import numpy as np
import pytest

from metrics import METRIC_NAMES, PROTOCOLS, evaluate, lookup, mig, sap

SIZES = (10, 10, 10, 10, 10)  # five independent factors of ten values
# Gradient boosting dominates the suite's time: DCI runs on fewer points here (as
# disentanglement_lib's own tests do); every other metric uses the protocol defaults.
FAST_DCI = {"dci": dict(num_train=500, num_test=250)}


def identity(factors):
    return factors.astype(np.float64)


def zeros(factors):
    return np.zeros(factors.shape, dtype=np.float64)


def duplicated(factors):
    return np.hstack([factors, factors]).astype(np.float64)


def with_noise(factors):
    noise = np.random.default_rng(len(factors)).normal(size=(len(factors), 5))
    return np.hstack([factors.astype(np.float64), noise])


@pytest.fixture(scope="module")
def identity_scores():
    return evaluate(identity, SIZES, METRIC_NAMES, seed=0, overrides=FAST_DCI)


@pytest.mark.parametrize("name, key", [("factor_vae", "score"), ("mig", "score"),
                                       ("beta_vae", "score"), ("dci", "disentanglement"),
                                       ("dci", "completeness"), ("dci", "informativeness_test"),
                                       ("modularity", "score"), ("explicitness", "score"),
                                       ("irs", "score")])
def test_identity_representation_scores_high(identity_scores, name, key):
    assert identity_scores[name][key] >= 0.9, identity_scores[name]


def test_identity_sap():
    # disentanglement_lib's own identity test scores SAP with continuous factors. In the discrete
    # mode the runner-up latent scores chance accuracy, so the gap cannot exceed 1 - chance: on
    # binary factors the matching latent is exact (1.0) and the others at chance (0.5).
    protocol = dict(PROTOCOLS["sap"], continuous_factors=True)
    assert sap(identity, SIZES, np.random.default_rng(0), **protocol)["score"] >= 0.9
    discrete = sap(identity, (2,) * 5, np.random.default_rng(0), **PROTOCOLS["sap"])
    assert min(discrete["per_factor"]) >= 0.45


def test_zero_representation_scores_low():
    # ten factors: chance level of the classifier-based scores is 0.1
    scores = evaluate(zeros, (10,) * 10, METRIC_NAMES, seed=0, overrides=FAST_DCI)
    assert scores["factor_vae"]["score"] == 0 and scores["factor_vae"]["num_active"] == 0
    for name in ("mig", "beta_vae", "sap"):
        assert scores[name]["score"] <= 0.2, (name, scores[name])
    assert scores["dci"]["disentanglement"] <= 0.2 and scores["dci"]["completeness"] <= 0.2
    assert scores["modularity"]["score"] == 0  # no latent carries information
    assert scores["explicitness"]["score"] == 0.5  # constant probabilities: chance ROC-AUC
    assert scores["irs"]["score"] == 0 and scores["irs"]["num_active"] == 0


def test_duplicated_latents():
    scores = evaluate(duplicated, SIZES, ("mig", "sap", "dci"), seed=0, overrides=FAST_DCI)
    assert scores["mig"]["score"] <= 0.1
    assert scores["sap"]["score"] <= 0.2
    assert scores["dci"]["disentanglement"] >= 0.9
    assert abs(scores["dci"]["completeness"] - (1 - math.log(2) / math.log(10))) <= 0.05


def test_one_latent_per_factor_plus_noise_latents():
    scores = evaluate(with_noise, SIZES, ("factor_vae", "mig"), seed=0)
    assert scores["factor_vae"]["score"] >= 0.9
    assert scores["mig"]["score"] >= 0.5


def test_rotating_a_perfect_representation_lowers_mig():
    rotation = np.linalg.qr(np.random.default_rng(1).normal(size=(5, 5)))[0]
    protocol = PROTOCOLS["mig"]
    rotated = mig(lambda f: (f - 4.5) @ rotation, SIZES, np.random.default_rng(0), **protocol)["score"]
    perfect = mig(identity, SIZES, np.random.default_rng(0), **protocol)["score"]
    assert perfect >= 0.9 and rotated < perfect - 0.5


def test_lookup_reads_codes_in_dataset_order():
    sizes = (2, 3, 4)
    codes = np.arange(24)[:, None] * np.ones((1, 2))
    represent = lookup(codes, sizes)
    assert represent(np.array([[0, 0, 0], [1, 2, 3], [0, 1, 2]]))[:, 0].tolist() == [0, 23, 6]


def test_scores_are_deterministic_for_a_seed():
    a = evaluate(with_noise, SIZES, ("factor_vae", "mig"), seed=3)
    assert a == evaluate(with_noise, SIZES, ("factor_vae", "mig"), seed=3)
    assert a["mig"] == evaluate(with_noise, SIZES, ("mig",), seed=3)["mig"]  # independent streams


def test_sap_fits_constant_latents_like_disentanglement_lib():
    """One informative latent and four constant ones: disentanglement_lib fits a classifier on a
    constant latent too, which scores about chance and so sets the runner-up of each gap."""
    def one_informative(factors):
        return np.hstack([factors[:, :1], np.zeros((len(factors), 4))]).astype(np.float64)
    result = sap(one_informative, SIZES, np.random.default_rng(0), **PROTOCOLS["sap"])
    accuracy = np.array(result["accuracy"])  # latents x factors
    assert np.all((accuracy[1:] > 0.05) & (accuracy[1:] < 0.2))  # fitted: about chance, not 0
    gaps = np.sort(accuracy, axis=0)[::-1]
    assert np.allclose(result["per_factor"], gaps[0] - gaps[1])
    assert result["per_factor"][0] == pytest.approx(accuracy[0, 0] - accuracy[1:, 0].max())
    assert result["score"] < 0.1  # skipping the constant latents would give ~0.14 here


def test_factor_vae_reports_active_latents_both_ways():
    from metrics import factor_vae_score
    result = factor_vae_score(with_noise, SIZES, np.random.default_rng(0),
                              **PROTOCOLS["factor_vae"])
    assert result["num_active"] == 10 and result["num_active_dims"] == 10
    half = factor_vae_score(lambda f: np.hstack([identity(f), np.zeros((len(f), 3))]), SIZES,
                            np.random.default_rng(0), **PROTOCOLS["factor_vae"])
    assert half["num_active"] == 5 and half["num_active_dims"] == 8  # dlib: its mask's length


UNSUPERVISED = ("gaussian_total_correlation", "gaussian_wasserstein_correlation",
                "gaussian_wasserstein_correlation_norm", "mutual_info_score")


def noisy_copy(factors):
    """Five independent factors and a copy of each plus N(0, 0.1^2) noise."""
    noise = np.random.default_rng(len(factors)).normal(scale=0.1, size=factors.shape)
    return np.hstack([factors, factors + noise]).astype(np.float64)


def test_unsupervised_scores_of_independent_codes_are_near_zero():
    scores = evaluate(identity, SIZES, UNSUPERVISED, seed=0)
    # sampling alone: E[TC] ~ K(K-1)/(4n) = 5e-4 for 5 independent latents, 10,000 points
    assert 0 <= scores["gaussian_total_correlation"]["score"] < 0.005
    assert abs(scores["gaussian_wasserstein_correlation_norm"]["score"]) < 0.005
    # factor variance (10^2 - 1)/12 = 8.25 per latent: the unnormalised form scales with it
    assert abs(scores["gaussian_wasserstein_correlation"]["score"]) < 0.005 * 5 * 8.25
    # discrete MI of independent 10-valued codes: only the plug-in bias, (10-1)^2 / (2n)
    assert 0 <= scores["mutual_info_score"]["score"] < 0.01


def test_unsupervised_scores_of_duplicated_codes_match_the_hand_computed_values():
    scores = evaluate(noisy_copy, SIZES, UNSUPERVISED, seed=0)
    # each pair (f, f + e): rho^2 = 8.25 / (8.25 + 0.01), TC = -0.5 log(1 - rho^2) per pair
    pair_tc = -0.5 * math.log(1 - 8.25 / 8.26)
    assert scores["gaussian_total_correlation"]["score"] == pytest.approx(5 * pair_tc, rel=0.05)
    # two latents of equal variance v and correlation rho: W = 2v (2 - sqrt(1+rho) - sqrt(1-rho)),
    # W / tr(C) = 2 - sqrt(1+rho) - sqrt(1-rho), ~2 - sqrt(2) at rho ~ 1
    rho = math.sqrt(8.25 / 8.26)
    norm = 2 - math.sqrt(1 + rho) - math.sqrt(1 - rho)
    assert scores["gaussian_wasserstein_correlation_norm"]["score"] == pytest.approx(norm, abs=0.01)
    assert scores["gaussian_wasserstein_correlation"]["score"] == pytest.approx(
        norm * 10 * 8.25, rel=0.05)
    # 10 latents, 90 ordered pairs, 10 of them a factor and its copy: MI = H(factor) = log 10
    assert scores["mutual_info_score"]["score"] == pytest.approx(10 * math.log(10) / 90, abs=0.01)


def test_unsupervised_scores_of_degenerate_codes():
    exact = evaluate(duplicated, SIZES, ("gaussian_total_correlation",), seed=0)
    assert exact["gaussian_total_correlation"]["score"] == math.inf  # singular covariance
    flat = evaluate(zeros, SIZES, UNSUPERVISED, seed=0)
    assert all(flat[name]["score"] == 0 for name in UNSUPERVISED), flat
    assert flat["gaussian_total_correlation"]["num_varying"] == 0


def test_a_constant_latent_adds_no_total_correlation():
    def with_constant(factors):
        return np.hstack([identity(factors), np.full((len(factors), 1), 3.0)])
    plain = evaluate(identity, SIZES, ("gaussian_total_correlation",), seed=0)
    padded = evaluate(with_constant, SIZES, ("gaussian_total_correlation",), seed=0)
    assert padded["gaussian_total_correlation"]["score"] == pytest.approx(
        plain["gaussian_total_correlation"]["score"])
    assert padded["gaussian_total_correlation"]["num_varying"] == 5
