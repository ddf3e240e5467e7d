"""Metric sanity checks from disentanglement_lib's own expectations, on synthetic factors."""
import math

import numpy as np
import pytest

from metrics import METRIC_NAMES, PROTOCOLS, evaluate, lookup, mig, sap

SIZES = (10, 10, 10, 10, 10)  # five independent factors of ten values
# Gradient boosting dominates the suite's time: DCI runs on fewer points here (as
# disentanglement_lib's own tests do); every other metric uses the protocol defaults.
FAST_DCI = {"dci": dict(num_train=2000, num_test=1000)}


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
                                       ("dci", "completeness"), ("dci", "informativeness_test")])
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
