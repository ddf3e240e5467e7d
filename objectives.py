"""The field's objectives beside Non-Syn VAE, as disentanglement_lib defines them: beta-TCVAE
(``--metric BTCVAE``), DIP-VAE-I and -II (``DIPVAE1``, ``DIPVAE2``) and AnnealedVAE
(``AnnealedVAE``). Each trains ``recon + regulariser`` on the same networks, data and optimiser
as the others; the Solver's ``step_field`` runs the one in ``FIELD``.

Each entry of ``FIELD`` takes the run's settings, the steps already taken, the batch's KL
(``model.kl_loss``: summed over latents, mean over the batch), the encoder's posterior (``mu``,
``logvar``: (B, K)) and its reparameterised sample ``z``, and returns the regulariser (a scalar
tensor) with the terms to log; tests/test_objectives.py checks each against its definition.
"""
import math

import torch


def gaussian_log_density(z, mu, logvar):
    """log N(z; mu, exp(logvar)) per element, the normalising constant log(2 pi) included."""
    return -0.5 * ((z - mu) ** 2 * torch.exp(-logvar) + logvar + math.log(2 * math.pi))


def total_correlation(z, mu, logvar):
    """Chen et al. 2018 (beta-TCVAE), minibatch-weighted sampling without its constants, as
    disentanglement_lib's ``total_correlation``: mean over j of log q(z_j) - sum_l log q(z_jl),
    with q(z_j) = sum_i q(z_j | x_i) and q(z_jl) = sum_i q(z_jl | x_i) over the batch. The
    log(N B) normalisers, dropped as disentanglement_lib drops them, would add the constant
    (K - 1) log(N B), which moves no gradient."""
    log_q = gaussian_log_density(z[:, None], mu[None], logvar[None])  # (B_j, B_i, K)
    log_qz = torch.logsumexp(log_q.sum(2), dim=1)  # (B_j,)
    log_prod_qz = torch.logsumexp(log_q, dim=1).sum(1)  # (B_j,)
    return (log_qz - log_prod_qz).mean()


def covariance(mu):
    """Cov_batch[mu] = E[mu mu^T] - E[mu] E[mu]^T (K, K), the biased batch estimate."""
    mean = mu.mean(0)
    return (mu[:, :, None] * mu[:, None, :]).mean(0) - mean[:, None] * mean[None, :]


def dip_penalty(mu, logvar, lambda_od, lambda_d_factor, dip_type):
    """DIP-VAE's term (Kumar et al. 2018, Eqs. 6-7): lambda_od * sum of squared off-diagonal
    entries + lambda_d * sum of squared (diagonal - 1) of C, lambda_d = lambda_d_factor *
    lambda_od; C = Cov[mu] (type "i") or Cov[mu] + E[diag(exp(logvar))] (type "ii")."""
    cov = covariance(mu)
    if dip_type == "ii":
        cov = cov + torch.diag(torch.exp(logvar).mean(0))
    elif dip_type != "i":
        raise ValueError(f"dip_type must be 'i' or 'ii', got {dip_type!r}")
    diagonal = torch.diagonal(cov)
    off_diagonal = cov - torch.diag(diagonal)
    return (lambda_od * (off_diagonal ** 2).sum()
            + lambda_d_factor * lambda_od * ((diagonal - 1) ** 2).sum())


def annealed_capacity(step, c_max, c_steps):
    """C at ``step`` (the number of steps already taken: 0 at the first), rising linearly from
    0 to c_max over c_steps steps, then held."""
    return c_max * min(1.0, step / c_steps)


def btcvae(c, step, kl, z, mu, logvar):
    """beta-TCVAE (Chen et al. 2018, Eq. 5 with alpha = gamma = 1): KL + (beta - 1) * TC."""
    tc = total_correlation(z, mu, logvar)
    return kl + (c.beta - 1) * tc, dict(tc=tc.detach())


def dip_vae(dip_type):
    """DIP-VAE-I ("i") or -II ("ii"): KL + the DIP penalty."""
    def regulariser(c, step, kl, z, mu, logvar):
        penalty = dip_penalty(mu, logvar, c.lambda_od, c.lambda_d_factor, dip_type)
        return kl + penalty, dict(dip=penalty.detach())
    return regulariser


def annealed_vae(c, step, kl, z, mu, logvar):
    """AnnealedVAE (Burgess et al. 2018, Eq. 8): c_gamma * |KL - C(step)|."""
    capacity = annealed_capacity(step, c.c_max, c.c_steps)
    return (c.c_gamma * (kl - capacity).abs(),
            dict(capacity=torch.full((), capacity, device=kl.device)))


# --metric name -> (config, steps already taken, kl, z, mu, logvar) -> (regulariser, {term: value})
FIELD = {"BTCVAE": btcvae, "DIPVAE1": dip_vae("i"), "DIPVAE2": dip_vae("ii"),
         "AnnealedVAE": annealed_vae}
