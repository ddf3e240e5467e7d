"""The rules that decide the thesis's claims from a run's factor shares (plotting.CLAIMS), on
synthetic share matrices that meet each rule and that narrowly miss it."""
import numpy as np
import pytest

import plotting
from dataset import FACTOR_NAMES


def shares_of(*rows, inactive=0):
    """A share matrix from {factor: share} rows (active latents), plus ``inactive`` zero rows."""
    shares = np.zeros((len(rows) + inactive, len(FACTOR_NAMES)))
    for j, row in enumerate(rows):
        for name, share in row.items():
            shares[j, FACTOR_NAMES.index(name)] = share
    active = np.arange(len(shares)) < len(rows)
    return shares, active


@pytest.mark.parametrize("rows, met", [
    (({"posX": 0.7, "posY": 0.15}, {"posY": 0.7, "posX": 0.15}), True),
    (({"posX": 0.96}, {"posY": 0.97}, {"scale": 0.8}), True),
    (({"posX": 0.69, "posY": 0.1}, {"posY": 0.9}), False),  # x just below SEPARATE
    (({"posX": 0.9, "posY": 0.16}, {"posY": 0.9}), False),  # x's latent leaks y past CROSS
    (({"posX": 0.57, "posY": 0.40}, {"posX": 0.40, "posY": 0.55}), False),  # a rotated pair
    (({"posX": 0.9}, {"posX": 0.8}), False),  # x twice, no y
])
def test_x_and_y_learned_separately(rows, met):
    assert plotting.xy_separate(*shares_of(*rows)) is met


def test_x_and_y_must_be_in_active_latents():
    shares, active = shares_of({"posX": 0.9}, {"posY": 0.9})
    active[1] = False
    assert not plotting.xy_separate(shares, active)


@pytest.mark.parametrize("share, met", [(0.5, True), (0.73, True), (0.49, False)])
def test_scale_learned(share, met):
    assert plotting.scale_learned(*shares_of({"scale": share, "shape": 0.1}, {"posX": 0.9})) \
        is met


@pytest.mark.parametrize("rows, count", [
    (({"orientation": 0.44}, {"orientation": 0.61}, {"orientation": 0.23}), 3),
    (({"orientation": 0.2}, {"orientation": 0.2, "scale": 0.1}), 2),
    (({"orientation": 0.61}, {"orientation": 0.19}), 1),  # the second just below ROTATION
    (({"orientation": 0.61}, {"orientation": 0.3, "posX": 0.35}), 1),  # rotation not its best
])
def test_rotation_in_two_latents(rows, count):
    shares, active = shares_of(*rows)
    assert len(plotting.rotation_latents(shares, active)) == count
    assert plotting.rotation_in_two(shares, active) is (count >= 2)


def test_an_uninformative_latent_is_an_inactive_one():
    assert plotting.uninformative_latent(*shares_of({"posX": 0.9}, inactive=1))
    assert not plotting.uninformative_latent(*shares_of({"posX": 0.9}, {"shape": 0.0}))


@pytest.mark.parametrize("rows, met", [
    (({"scale": 0.33, "posY": 0.33}, {"posX": 0.42, "posY": 0.35}, {"posX": 0.67}), True),
    (({"scale": 0.69}, {"posX": 0.5, "posY": 0.4}), True),
    (({"scale": 0.7}, {"posX": 0.5, "posY": 0.4}), False),  # one latent learned scale alone
    ((), False),  # no active latent: nothing to call entangled
])
def test_entangled(rows, met):
    assert plotting.entangled(*shares_of(*rows, inactive=2)) is met


def test_claims_met_reads_a_summary_through_the_factor_shares():
    """A summary whose latent 0 is x alone, latent 1 y alone and latent 2 inactive."""
    x = np.repeat(np.linspace(-1, 1, 4), 4)
    y = np.tile(np.linspace(-1, 1, 4), 4)
    summary = dict(variance=np.array([x.var(), y.var(), 0.0]))
    for name in FACTOR_NAMES:
        summary[f"marginal_{name}"] = np.zeros((4, 3))
    summary["marginal_posX"][:, 0] = np.linspace(-1, 1, 4)
    summary["marginal_posY"][:, 1] = np.linspace(-1, 1, 4)
    met = plotting.claims_met(summary)
    assert met == dict(xy=True, scale=False, rotation=False, uninformative=True, entangled=False)
    assert [key for key, _, _ in plotting.CLAIMS] == list(met)
