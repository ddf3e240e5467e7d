"""The field's regularisers (objectives.py) against their definitions, written out literally."""
import math

import numpy as np
import pytest
import torch

from objectives import (annealed_capacity, annealed_regulariser, btcvae_regulariser, covariance,
                        dip_regulariser, gaussian_log_density, total_correlation)


def posterior(batch=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(batch, k, generator=g, dtype=torch.float64)
    logvar = torch.randn(batch, k, generator=g, dtype=torch.float64) * 0.5
    z = mu + torch.randn(batch, k, generator=g, dtype=torch.float64) * (0.5 * logvar).exp()
    return z, mu, logvar


def test_gaussian_log_density_is_the_normal_log_density():
    z, mu, logvar = posterior()
    expected = torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(z)
    assert torch.allclose(gaussian_log_density(z, mu, logvar), expected)


def test_total_correlation_is_the_minibatch_weighted_estimate_written_out():
    z, mu, logvar = posterior()
    b, k = mu.shape
    n = lambda j, i, l: math.exp(gaussian_log_density(z[j, l], mu[i, l], logvar[i, l]).item())
    terms = []
    for j in range(b):
        log_qz = math.log(sum(math.prod(n(j, i, l) for l in range(k)) for i in range(b)))
        log_prod = sum(math.log(sum(n(j, i, l) for i in range(b))) for l in range(k))
        terms.append(log_qz - log_prod)
    assert total_correlation(z, mu, logvar).item() == pytest.approx(np.mean(terms), rel=1e-9)


def test_total_correlation_vanishes_for_one_latent_or_one_image():
    z, mu, logvar = posterior(k=1)
    assert total_correlation(z, mu, logvar).item() == pytest.approx(0, abs=1e-12)
    z, mu, logvar = posterior(batch=1)
    assert total_correlation(z, mu, logvar).item() == pytest.approx(0, abs=1e-12)


def test_btcvae_adds_beta_minus_one_tc_and_has_gradients():
    z, mu, logvar = posterior()
    mu.requires_grad_(True)
    kl = torch.tensor(3.0, dtype=torch.float64)
    tc = total_correlation(z, mu, logvar)
    value = btcvae_regulariser(kl, z, mu, logvar, beta=6.0)
    assert value.item() == pytest.approx(3.0 + 5.0 * tc.item())
    assert btcvae_regulariser(kl, z, mu, logvar, beta=1.0).item() == pytest.approx(3.0)
    value.backward()
    assert mu.grad is not None and torch.isfinite(mu.grad).all() and mu.grad.abs().sum() > 0


def test_covariance_is_the_biased_batch_covariance():
    _, mu, _ = posterior(batch=50, k=4)
    assert np.allclose(covariance(mu).numpy(), np.cov(mu.numpy(), rowvar=False, bias=True))


def test_dip_regularisers_by_hand():
    # two latents over four images: Cov[mu] = [[1, 0.5], [0.5, 1]] (means 0, biased)
    mu = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    mu = mu * torch.tensor([1.0, math.sqrt(2)], dtype=torch.float64)
    cov = covariance(mu)
    assert torch.allclose(cov, torch.tensor([[1.0, math.sqrt(2) / 2], [math.sqrt(2) / 2, 1.0]],
                                            dtype=torch.float64))
    kl = torch.tensor(2.0, dtype=torch.float64)
    logvar = torch.full_like(mu, math.log(0.5))
    # type i: off-diagonal 2 * (sqrt(2)/2)^2 = 1, diagonal (1 - 1)^2 = 0
    assert dip_regulariser(kl, mu, logvar, 10.0, 10.0, "i").item() == pytest.approx(2 + 10 * 1)
    # type ii: the diagonal gains E[exp(logvar)] = 0.5: 2 * 0.5^2 = 0.5, times lambda_d = 1 * 10
    assert dip_regulariser(kl, mu, logvar, 10.0, 1.0, "ii").item() == pytest.approx(
        2 + 10 * 1 + 10 * 0.5)
    with pytest.raises(ValueError, match="dip_type"):
        dip_regulariser(kl, mu, logvar, 10.0, 1.0, "iii")


def test_annealed_capacity_and_regulariser():
    assert annealed_capacity(0, 25.0, 100000) == 0.0  # the first step
    assert annealed_capacity(50000, 25.0, 100000) == pytest.approx(12.5)
    assert annealed_capacity(100000, 25.0, 100000) == annealed_capacity(300000, 25.0, 100000) == 25
    kl = torch.tensor(20.0)
    assert annealed_regulariser(kl, 50000, 25.0, 100000, 1000.0).item() == pytest.approx(7500.0)
    assert annealed_regulariser(kl, 200000, 25.0, 100000, 1000.0).item() == pytest.approx(5000.0)
