"""The default update against the original trainer itself.

tests/data/original_replay_s120.npz holds what the unmodified original training loop did for its
first 30 steps (under PyTorch 1.0.1, which behaves like 0.4.1 there) from given weights, batches
and reparameterisation noise, in both --sample modes: alpha 5, omega 0.9, batch 64, Adam lr 1e-4,
the 2020 architecture. The project's own Solver replays it through its public step, with the
fixture's batches and noise handed in.
"""

import numpy as np
import pytest

from conftest import FIXTURE, ReplayBatches, ReplayNoise, in_module_order
from config import Config
from solver import Solver

@pytest.fixture(scope="module")
def original():
    return dict(np.load(FIXTURE))


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
