"""The greedy policy against a literal transcription of the original loop, and the penalty."""
import math

import pytest
import torch

from synergy import greedy_best_set, kl_per_latent, synergy_penalty


def original_greedy(k, omega):
    """Literal transcription of the original's policy on a list of floats (REFERENCE §1)."""
    z_dim = len(k)
    best, record = [], 0.0
    for _ in range(z_dim):
        chosen = list(best)
        for j in range(z_dim):
            if j in best:
                continue
            v = 0.0
            for i in best + [j]:
                v += k[i]
            accept = v > record if not best else omega * v > record
            if accept:
                chosen = best + [j]
                record = v
        best = chosen
    return [j in best for j in range(z_dim)]


def random_kl_vectors(n, z_dim, seed):
    """Mixed cases: continuous, small-integer values (many ties), zeros, one dominant latent,
    several equal maxima."""
    g = torch.Generator().manual_seed(seed)
    k = torch.rand(n, z_dim, generator=g, dtype=torch.float64) * 10
    q = n // 6
    k[:q] = torch.randint(0, 4, (q, z_dim), generator=g).double()  # ties everywhere
    k[q:2 * q] = 0.0
    k[q:2 * q, 0] = torch.rand(q, generator=g, dtype=torch.float64)  # one non-zero latent
    k[2 * q:3 * q, z_dim // 2] *= 100  # one dominant latent
    k[3 * q:4 * q] = torch.rand(q, 1, generator=g, dtype=torch.float64)  # all equal
    k[4 * q:4 * q + 10] = 0.0  # all zero
    return k


@pytest.mark.parametrize("z_dim", [1, 2, 3, 5, 10, 16])
@pytest.mark.parametrize("omega", [0.3, 0.8, 0.9, 1.0])
def test_greedy_matches_original_loop(z_dim, omega):
    k = random_kl_vectors(600 if z_dim <= 10 else 300, z_dim, seed=z_dim)
    expected = torch.tensor([original_greedy(row, omega) for row in k.tolist()])
    got = greedy_best_set(k, omega)
    mismatches = (got != expected).any(-1).nonzero().flatten()
    assert len(mismatches) == 0, f"{len(mismatches)} mismatches, first {k[mismatches[0]].tolist()}"


def test_greedy_keeps_the_last_candidate_that_beats_the_record():
    # omega 0.78, round 2 from B = [0] (record 10): j=1 gives 0.78 * 13 = 10.14 > 10, record
    # becomes 13; j=2 gives 0.78 * 13.2 = 10.30 < 13, rejected although k_2 > k_1. Round 3:
    # 0.78 * 16.2 = 12.64 < 13, so latent 2 stays out: a "largest first" policy would differ.
    k = torch.tensor([10.0, 3.0, 3.2], dtype=torch.float64)
    assert greedy_best_set(k, 0.78).tolist() == [True, True, False] == original_greedy(k.tolist(), 0.78)


def test_greedy_round_one_is_first_argmax_and_zero_vector_selects_nothing():
    k = torch.tensor([1.0, 3.0, 3.0, 0.5])
    assert greedy_best_set(k, 0.01).tolist() == [False, True, False, False]
    assert not greedy_best_set(torch.zeros(7), 0.9).any()


def test_greedy_leading_dims_and_float32_ties():
    # dyadic values are exact in float32 and float64, so the comparison is exact in both
    k = torch.randint(0, 8, (4, 5, 6), generator=torch.Generator().manual_seed(1)).float() / 4
    got = greedy_best_set(k, 0.75)
    assert got.shape == k.shape and got.dtype == torch.bool
    for index in range(20):
        row = k.view(20, 6)[index]
        assert got.view(20, 6)[index].tolist() == original_greedy(row.double().tolist(), 0.75)


def test_kl_is_additive_over_latents():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    subset = [1, 3, 4]
    q = torch.distributions.MultivariateNormal(mu[:, subset], torch.diag_embed(logvar[:, subset].exp()))
    p = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    joint = torch.distributions.kl_divergence(q, p)  # KL of the subset as one Gaussian
    assert torch.allclose(joint, kl_per_latent(mu, logvar)[:, subset].sum(1))


def test_penalty_is_alpha_times_worst_set_kl_and_grads_flow_only_through_it():
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(32, 10, generator=g, dtype=torch.float64, requires_grad=True)
    logvar = (0.3 * torch.randn(32, 10, generator=g, dtype=torch.float64)).requires_grad_()
    syn, best = synergy_penalty(mu, logvar, omega=0.9, alpha=5.0)
    k = kl_per_latent(mu, logvar).mean(0)
    assert best.tolist() == original_greedy(k.tolist(), 0.9)
    assert 0 < best.sum() < 10
    assert math.isclose(syn.item(), 5.0 * k[~best].sum().item(), rel_tol=1e-12)
    syn.backward()
    assert torch.all(mu.grad[:, best] == 0) and torch.all(mu.grad[:, ~best] != 0)
    expected = 5.0 * mu[:, ~best].detach() / 32  # d/dmu of alpha * mean_b 0.5 mu^2
    assert torch.allclose(mu.grad[:, ~best], expected)
