"""Every objective ``--metric`` trains, one short unit each, and their table ``OBJECTIVES``.

An objective is one optimisation step on the Solver's networks, data and optimisers:
``step(s)`` takes the Solver ``s`` and returns ``(values, best)`` through ``s.measured``:
detached 0-dim tensors to log (``recon``, ``kl``, ``total``: the loss the step minimises, each
regulariser term by name, and the synergy measures ``syn``, ``i_max``) and the greedy best-set
mask. The Solver provides the pieces: ``s.elbo_terms()`` (the training batch's recon, KL, mu,
logvar, z), ``s.optim`` (the VAE's Adam), ``s.config``, ``s.step`` (steps already taken).

Adding an objective: write its step here and add one row to ``OBJECTIVES``; ``--metric``, the
run names, labels, study axes and ``--help`` follow from the row.

The field's regularisers (beta-TCVAE, DIP-VAE-I/II, AnnealedVAE) are written as
disentanglement_lib defines them; each takes the run's settings, the steps already taken, the
batch's KL (summed over latents, mean over the batch), the reparameterised sample ``z`` and the
posterior ``mu``, ``logvar`` (B, K), and returns the regulariser with the terms to log;
tests/test_objectives.py checks each against its definition.
"""
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.nn import functional as F

from model import permute_dims, reparameterise
from synergy import synergy_penalty


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


# --- the steps ------------------------------------------------------------------------------------

def _logged(recon, kl, syn, total, **terms):
    return dict(recon=recon.detach(), kl=kl.detach(), syn=syn.detach(),
                **{k: v.detach() for k, v in terms.items()}, total=total.detach())


def _minimise(s, loss):
    """One Adam step of the VAE on ``loss``, the gradients left from the last step dropped."""
    s.optim.zero_grad(set_to_none=True)
    loss.backward()
    s.optim.step()


# --- the optimisers (Non-Syn VAE's original update needs PyTorch 0.4.1's Adam) ----------------

class Adam041(torch.optim.Optimizer):
    """Adam as PyTorch 0.4.1 ran it, for the original update (REFERENCE: replay-tested).

    - Arithmetic: m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2;
      p <- p - lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps). Today's Adam adds eps
      after the bias correction: a 30x larger effective eps at t = 1, where the KL gradients
      are tiny.
    - Parameters move in place through ``p.data``, which does not bump their autograd version
      counter: a graph built before the step can still be back-propagated afterwards, reading
      the new weights (the original's stale graph, on purpose; torch.optim would raise).
    - ``zero_grad`` zeroes gradients instead of dropping them, and only a parameter whose grad
      is None is skipped: a parameter outside the loss still moves by its Adam momentum.
    """

    def __init__(self, params, lr, betas, eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    def zero_grad(self, set_to_none=False):
        super().zero_grad(set_to_none=False)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self.state[p] for p in params]
            for p, state in zip(params, states, strict=True):
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
            grads = [p.grad for p in params]
            m = [s["exp_avg"] for s in states]
            v = [s["exp_avg_sq"] for s in states]
            # the same arithmetic as one tensor at a time, in one call per operation
            torch._foreach_mul_(m, beta1)
            torch._foreach_add_(m, grads, alpha=1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_add_(denom, group["eps"])
            steps = [-group["lr"] * math.sqrt(1 - beta2 ** s["step"]) / (1 - beta1 ** s["step"])
                     for s in states]
            torch._foreach_addcdiv_([p.data for p in params], m, denom, steps)


def vae_optimiser(model, config):
    """The VAE's optimiser: 0.4.1's Adam for Non-Syn VAE's original update, today's otherwise."""
    adam = Adam041 if OBJECTIVES[config.metric].step is nonsyn and config.update == "original" \
        else torch.optim.Adam
    return adam(model.parameters(), lr=config.lr_VAE, betas=(config.beta1_VAE, config.beta2_VAE))


def discriminator_optimiser(D, config):
    return torch.optim.Adam(D.parameters(), lr=config.lr_D, betas=(config.beta1_D, config.beta2_D))


def nonsyn_original(s):
    """Non-Syn VAE exactly as the original trains it (``--update original``, the default),
    replay-tested against the original trainer step for step (tests/test_replay.py)."""
    c = s.config
    # 1. ELBO terms at θ_t; the graph is kept for step 4.
    recon, kl, mu, logvar, _ = s.elbo_terms()
    # 2. Adam (0.4.1) on recon + KL. It moves θ_t -> θ_t+½ in place through .data, so the
    #    graph of step 1 survives the update.
    s.optim.zero_grad()
    (recon + kl).backward(retain_graph=True)
    s.optim.step()
    # 3. The synergy penalty from this batch's posterior, or, with --sample sample, from a
    #    forward pass of the partner batch at θ_t+½.
    syn, best = synergy_penalty(*s.penalty_posterior(mu, logvar), c.omega, c.alpha)
    # 4. Adam again on the synergy gradient. Without --sample it flows back through step 1's
    #    graph: activations of θ_t, but the weights as step 2 left them, the original's stale
    #    graph (its gradient is 2-9 % off the one at θ_t early on). The decoder's gradients
    #    are zero, and its Adam moments still move it.
    s.optim.zero_grad()
    syn.backward()
    s.optim.step()
    return s.measured(_logged(recon, kl, syn, recon + kl + syn), mu, logvar, best)


def nonsyn_two_step(s):
    """Non-Syn VAE, the original's two Adam steps with both gradients taken at the parameters
    they belong to (``--update two-step``; see README, deviations)."""
    c = s.config
    # 1. ELBO terms at θ_t.
    recon, kl, mu, logvar, _ = s.elbo_terms()
    # 2. The synergy gradient of the encoder at θ_t, taken before step 3 changes θ ...
    if c.sample == "no_sample":
        syn, best, syn_grads = s.synergy_gradient(mu, logvar, retain_graph=True)
    # 3. Adam on recon + KL: θ_t -> θ_t+½.
    _minimise(s, recon + kl)
    # 2. ... or, with --sample sample, on the partner batch at θ_t+½, as the original.
    if c.sample == "sample":
        syn, best, syn_grads = s.synergy_gradient(*s.penalty_posterior(mu, logvar))
    # 4. Adam on the synergy gradient. The decoder gets explicit zero gradients, as PyTorch
    #    0.4.1's zero_grad left them, so its Adam moments still decay and move it.
    for p, g in zip(s.model.encoder.parameters(), syn_grads, strict=True):
        p.grad = g
    for p in s.model.decoder.parameters():
        p.grad.zero_()
    s.optim.step()
    return s.measured(_logged(recon, kl, syn, recon + kl + syn), mu, logvar, best)


def nonsyn_joint(s):
    """Non-Syn VAE, one Adam step on recon + KL + alpha * KL(worst set) at θ_t."""
    c = s.config
    recon, kl, mu, logvar, _ = s.elbo_terms()
    syn, best = synergy_penalty(*s.penalty_posterior(mu, logvar), c.omega, c.alpha)
    _minimise(s, recon + kl + syn)
    return s.measured(_logged(recon, kl, syn, recon + kl + syn), mu, logvar, best)


NONSYN_UPDATES = {"original": nonsyn_original, "two-step": nonsyn_two_step,
                  "joint": nonsyn_joint}  # --update


def nonsyn(s):
    """Non-Syn VAE (Barrientos & Sootla 2018): recon + KL + alpha * KL of the greedy worst
    set, updated as ``--update`` says."""
    return NONSYN_UPDATES[s.config.update](s)


def _measured_only(s, mu, logvar):
    """The synergy penalty of an objective that does not optimise it: (syn, best)."""
    return synergy_penalty(mu.detach(), logvar.detach(), s.config.omega, s.config.alpha)


def beta_vae(s, beta):
    """recon + beta * KL (Higgins et al. 2017); beta = 1 is the plain VAE (Kingma & Welling
    2014). Synergy is only measured."""
    recon, kl, mu, logvar, _ = s.elbo_terms()
    loss = recon + beta * kl
    _minimise(s, loss)
    syn, best = _measured_only(s, mu, logvar)
    return s.measured(_logged(recon, kl, syn, loss), mu, logvar, best)


def vae(s):
    """VAE: recon + KL."""
    return beta_vae(s, 1.0)


def bvae(s):
    """beta-VAE: recon + beta * KL, beta from ``--beta``."""
    return beta_vae(s, s.config.beta)


def field_step(regulariser):
    """The step of a field objective: recon + ``regulariser`` (a ``FIELD`` entry) of this
    batch, its terms logged; AnnealedVAE's capacity follows the steps already taken. Synergy
    is only measured."""
    def step(s):
        recon, kl, mu, logvar, z = s.elbo_terms()
        value, terms = regulariser(s.config, s.step, kl, z, mu, logvar)
        loss = recon + value
        _minimise(s, loss)
        syn, best = _measured_only(s, mu, logvar)
        return s.measured(_logged(recon, kl, syn, loss, **terms), mu, logvar, best)
    step.__doc__ = regulariser.__doc__
    return step


def factor_vae(s):
    """FactorVAE (Kim & Mnih 2018): recon + KL + gamma * TC, TC estimated by the
    discriminator's logit gap; then one discriminator step on detached z against
    dimension-shuffled z' from a second batch. Synergy is only measured."""
    c = s.config
    recon, kl, mu, logvar, z = s.elbo_terms()
    s.D.requires_grad_(False)
    with s.autocast():
        d_z = s.D(z)  # B, 2
    tc = (d_z[:, 0] - d_z[:, 1]).mean()
    loss = recon + kl + c.gamma * tc
    _minimise(s, loss)
    s.D.requires_grad_(True)

    with torch.no_grad(), s.autocast():
        mu2, logvar2 = s.model.encoder(s.batches.partner(s.step))
    z_perm = permute_dims(reparameterise(mu2, logvar2, s.noise(mu2)))
    zeros = torch.zeros(len(z), dtype=torch.long, device=z.device)
    with s.autocast():
        d_joint, d_perm = s.D(z.detach()), s.D(z_perm)
    d_loss = 0.5 * (F.cross_entropy(d_joint, zeros)
                    + F.cross_entropy(d_perm, torch.ones_like(zeros)))
    s.optim_D.zero_grad(set_to_none=True)
    d_loss.backward()
    s.optim_D.step()
    syn, best = _measured_only(s, mu, logvar)
    return s.measured(_logged(recon, kl, syn, loss, tc=tc, d_loss=d_loss), mu, logvar, best)


# --- the table ------------------------------------------------------------------------------------

class Objective(NamedTuple):
    name: str  # what a reader calls it
    settings: tuple  # the Config fields that define it: run names, labels, study axes
    step: Callable  # step(solver) -> (values, best): one optimisation step
    help: str  # its line in --help
    discriminator: bool = False  # the Solver builds FactorVAE's discriminator and its Adam
    defaults: dict = {}  # its own defaults of shared settings left unset (None)


NONSYN_HELP = "Non-Syn VAE (Barrientos & Sootla 2018): recon + KL + alpha * KL(worst set)"
OBJECTIVES = {  # --metric -> Objective(name, settings, step, help, ...)
    "Test_gt": Objective("Non-Syn VAE", ("alpha", "omega"), nonsyn, NONSYN_HELP),
    "test": Objective("Non-Syn VAE", ("alpha", "omega"), nonsyn,
                      "Non-Syn VAE as Test_gt, with live visdom plots"),
    "VAE": Objective("VAE", (), vae, "VAE (Kingma & Welling 2014): recon + KL"),
    "BVAE": Objective("beta-VAE", ("beta",), bvae,
                      "beta-VAE (Higgins et al. 2017): recon + beta * KL"),
    "BVAE_gt": Objective("beta-VAE", ("beta",), bvae,
                         "beta-VAE as BVAE (the original's name for it)"),
    "Factor": Objective("FactorVAE", ("gamma",), factor_vae,
                        "FactorVAE (Kim & Mnih 2018): recon + KL + gamma * TC (discriminator)",
                        discriminator=True),
    "BTCVAE": Objective("beta-TCVAE", ("beta",), field_step(btcvae),
                        "beta-TCVAE (Chen et al. 2018): recon + KL + (beta - 1) * TC "
                        "(minibatch)"),
    "DIPVAE1": Objective("DIP-VAE-I", ("lambda_od", "lambda_d_factor"),
                         field_step(FIELD["DIPVAE1"]),
                         "DIP-VAE-I (Kumar et al. 2018): recon + KL + DIP penalty of Cov[mu]",
                         defaults=dict(lambda_d_factor=10.0)),
    "DIPVAE2": Objective("DIP-VAE-II", ("lambda_od", "lambda_d_factor"),
                         field_step(FIELD["DIPVAE2"]),
                         "DIP-VAE-II (Kumar et al. 2018): recon + KL + DIP penalty of Cov[z]",
                         defaults=dict(lambda_d_factor=1.0)),
    "AnnealedVAE": Objective("AnnealedVAE", ("c_max",), field_step(annealed_vae),
                             "AnnealedVAE (Burgess et al. 2018): recon + c_gamma * |KL - C(step)|"),
}
