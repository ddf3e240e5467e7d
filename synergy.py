"""The synergy penalty of Non-Synergistic VAE (Barrientos & Sootla, 2018).

For a factorised Gaussian posterior the KL is additive over latent dimensions, so the
original's "I_max" of any subset S of latents is the sum of the per-latent batch-mean
KLs k_j over S. A greedy policy picks a "best" set B from the vector k; the penalty is
``alpha * sum_{j not in B} k_j``, alpha times the KL of the "worst" set (I_max, which every
objective logs alpha-free at one measurement omega). Selection uses values only; gradients flow
through the penalty alone.

Everything here is a pure function on tensors: no host synchronisation, any device.
"""
import math

import torch


def kl_per_latent(mu, logvar):
    """Analytic KL(N(mu, exp(logvar)) || N(0, I)) per sample and latent: (B, z) -> (B, z)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0)


def greedy_best_set(kl, omega):
    """Mark the greedy "best" set of latents for every vector in ``kl``.

    kl: float tensor (..., z_dim) of per-latent batch-mean KLs. Returns a bool tensor of the
    same shape, exactly the original policy (scan order and ties included)::

        B = []; record = 0
        repeat z_dim times:
            C = B
            for j not in B, ascending:
                v = sum(k[B + [j]])
                accept if (v > record if B is empty else omega * v > record)
                on accept: C = B + [j]; record = v
            B = C

    Round one is the strict argmax (ties -> lowest index). In a later round the record starts
    at v(B) = sum(k[B]) and candidate j is accepted when omega * (s + k_j) beats the value of the
    last accepted candidate, so the round keeps the *last* link of a chain. Each round is
    evaluated for all candidates at once: ``nxt[i]`` is the first candidate after i that beats
    i, and pointer doubling follows the chain to its end in log2(z_dim) gathers.
    """
    kl = kl.detach()
    z_dim = kl.shape[-1]
    k = kl.reshape(-1, z_dim)  # N, z
    device = k.device

    # Round one: running record from 0 with a strict ">", i.e. the first index of the maximum.
    first = k.argmax(dim=-1, keepdim=True)  # N, 1
    k_first = k.gather(-1, first)  # N, 1
    accepted = k_first > 0
    s = torch.where(accepted, k_first, torch.zeros_like(k_first))  # N, 1: sum(k[B])
    # Membership per node: node 0 is the start of a round, node j+1 is latent j.
    in_best = torch.zeros(k.shape[0], z_dim + 1, dtype=torch.bool, device=device)
    in_best.scatter_(-1, (first + 1) * accepted, True)

    nodes = torch.arange(z_dim + 1, device=device)  # z+1
    after = nodes[None, 1:] > nodes[:, None]  # z+1, z: latent j comes after node i in the scan
    no_next = torch.full((), z_dim + 1, device=device)  # a fill, not a host-to-device copy
    n_doublings = max(1, math.ceil(math.log2(z_dim)))
    for _ in range(z_dim - 1):
        v = s + k  # N, z: sum(k[B + [j]]), summed in acceptance order like the original
        record = torch.cat([s, v], dim=-1)  # N, z+1: the record once the scan reaches each node
        # a Python fill value: a 0-dim device tensor there would be read back to the host (a sync)
        challenger = (omega * v).masked_fill_(in_best[:, 1:], float("-inf"))  # N, z
        beats = (challenger[:, None, :] > record[:, :, None]).logical_and_(after)  # N, z+1, z
        # nxt[i]: the first latent after node i that beats its record; a node with none is final.
        nxt = torch.where(beats, nodes[1:], no_next).amin(-1)  # N, z+1
        nxt = torch.where(nxt > z_dim, nodes, nxt)
        for _ in range(n_doublings):
            nxt = nxt.gather(-1, nxt)
        last = nxt[:, :1]  # N, 1: end of the chain that starts at node 0 (0 if nothing accepted)
        in_best.scatter_(-1, last, True)
        s = record.gather(-1, last)
    best = in_best[:, 1:]
    return best.reshape(kl.shape)


def worst_set_kl(kl, omega):
    """I_max, alpha-free: the KL of the "worst" set (every latent outside the greedy best set at
    ``omega``) of per-latent batch-mean KLs ``kl`` (..., z). Returns (I_max (...), best mask)."""
    best = greedy_best_set(kl, omega)
    return kl.masked_fill(best, 0.0).sum(-1), best


def synergy_penalty(mu, logvar, omega, alpha):
    """Synergy loss ``alpha * KL(worst set)`` and the best-set mask, from one batch's posterior.

    mu, logvar: (B, z). Returns (syn, best): syn a 0-dim tensor differentiable w.r.t. mu and
    logvar; best a bool (z,) mask (selection carries no gradient).
    """
    i_max, best = worst_set_kl(kl_per_latent(mu, logvar).mean(0), omega)
    return alpha * i_max, best
