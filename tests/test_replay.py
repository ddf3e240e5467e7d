"""The default update against the original trainer itself.

tests/data/original_replay_s120.npz holds what the unmodified original training loop did for its
first 30 steps (under PyTorch 1.0.1, which behaves like 0.4.1 there) from given weights, batches
and reparameterisation noise, in both --sample modes: alpha 5, omega 0.9, batch 64, Adam lr 1e-4,
the 2020 architecture. The project's own Solver replays it through its public step, with the
fixture's batches and noise handed in.
"""
import re

import numpy as np
import pytest
import torch

from conftest import FIXTURES
from solver import Config, Solver

FIXTURE = FIXTURES / "original_replay_s120.npz"


@pytest.fixture(scope="module")
def original():
    return dict(np.load(FIXTURE))


def images(packed):
    """uint8 (B, 512) packed bits -> float (B, 1, 64, 64)."""
    return torch.from_numpy(np.unpackbits(packed, axis=-1).reshape(-1, 1, 64, 64).astype(np.float32))


class ReplayBatches:
    """The fixture's batch of every step, and its partner batch (--sample sample)."""

    def __init__(self, original):
        self.original = original

    def train(self, step):
        return images(self.original["batches"][step])

    def partner(self, step):
        return images(self.original["partner_batches"][step])


class ReplayNoise:
    """The fixture's noise slabs, one per reparameterised sample, in the order they are drawn."""

    def __init__(self, original):
        self.slabs = torch.from_numpy(original["noise"])
        self.drawn = 0

    def __call__(self, like):
        slab = self.slabs[self.drawn]
        self.drawn += 1
        assert slab.shape == like.shape
        return slab


def in_module_order(original, prefix):
    """The fixture's tensors under ``prefix`` (original key names such as ``encoder.9.weight``),
    sorted as the modules are registered: network, layer index, weight before bias."""
    names = [k[len(prefix):] for k in original if k.startswith(prefix)]

    def key(name):
        net, index, kind = re.fullmatch(r"(encoder|decoder)\.(\d+)\.(weight|bias)", name).groups()
        return net == "decoder", int(index), kind == "bias"
    return [torch.from_numpy(original[prefix + n]) for n in sorted(names, key=key)]


@pytest.mark.parametrize("sample", ["no_sample", "sample"])
def test_default_update_replays_the_original_trainer(tmp_path, original, sample):
    config = Config(sample=sample, alpha=5.0, omega=0.9, batch_size=64, grid="reduced",
                    cuda=False)
    assert config.update == "original" and config.arch == "2020"  # the defaults are replayed
    noise = ReplayNoise(original)
    solver = Solver(config, tmp_path, batches=ReplayBatches(original), noise=noise)
    keys = list(solver.model.state_dict())
    solver.model.load_state_dict(dict(zip(keys, in_module_order(original, "init/"), strict=True)))

    steps = len(original[f"{sample}/recon"])
    for t in range(steps):
        values, best = solver.advance()
        for term in ("recon", "kl", "syn"):
            got, expected = values[term].item(), original[f"{sample}/{term}"][t]
            # the original printed 4 decimals: relative 1e-3, absolute below 1
            assert abs(got - expected) <= 1e-3 * max(abs(expected), 1.0), (t, term, got, expected)
        assert best.tolist() == original[f"{sample}/best"][t].tolist(), t
    assert noise.drawn == steps * (2 if sample == "sample" else 1)

    final = in_module_order(original, f"{sample}/final/")
    for name, expected in zip(keys, final, strict=True):
        got = solver.model.state_dict()[name]
        assert ((got - expected).norm() / expected.norm()).item() <= 2e-3, name


def test_the_replay_tells_the_original_update_from_the_clean_two_step(tmp_path, original):
    """The stale graph matters: the same replay with both gradients at θ_t (and today's Adam)
    leaves the original's path within 30 steps."""
    config = Config(update="two-step", alpha=5.0, omega=0.9, batch_size=64, grid="reduced",
                    cuda=False)
    solver = Solver(config, tmp_path, batches=ReplayBatches(original), noise=ReplayNoise(original))
    keys = list(solver.model.state_dict())
    solver.model.load_state_dict(dict(zip(keys, in_module_order(original, "init/"), strict=True)))
    worst = 0.0
    for t in range(len(original["no_sample/syn"])):
        values, _ = solver.advance()
        expected = original["no_sample/syn"][t]
        worst = max(worst, abs(values["syn"].item() - expected) / max(abs(expected), 1.0))
    assert worst > 1e-2
