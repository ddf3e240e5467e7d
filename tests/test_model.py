"""The networks as the original built them: PyTorch 0.4.1's initialisation bounds, the 2018
decoder, the discriminator's slope; and the figures' drawing as the original drew them."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from model import VAE, Discriminator, init_as_pytorch_041, reparameterise
from plotting import image_grid, save_ground_truth_plot
from config import Config
from representation import traversal_rows
from solver import Solver


def layers(module):
    return [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]


def bound_041(layer):
    fan = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels * math.prod(layer.kernel_size)
    return 1 / math.sqrt(fan)


@pytest.mark.parametrize("arch", ["2020", "2018"])
def test_every_layer_is_drawn_within_pytorch_041_bounds(arch):
    torch.manual_seed(0)
    model = init_as_pytorch_041(VAE(10, arch=arch))
    found = layers(model) + layers(init_as_pytorch_041(Discriminator(10)))
    assert len(found) == 12 + 6
    for layer in found:
        bound = bound_041(layer)
        for tensor in (layer.weight, layer.bias):
            assert tensor.abs().max() <= bound
            if tensor.numel() >= 64:  # uniform draws fill the range
                assert tensor.abs().max() >= 0.9 * bound, layer
    out = layers(model.decoder)[-1]  # ConvT(32 -> 1): 0.4.1 bound 1/sqrt(32*16) = 0.0442
    assert isinstance(out, nn.ConvTranspose2d) and math.isclose(bound_041(out), 0.0442, abs_tol=1e-4)


def test_solver_initialises_as_041_by_default_and_as_today_on_request(tmp_path):
    common = dict(grid="reduced", batch_size=8, cuda=False)
    original = layers(Solver(Config(**common), tmp_path).model.decoder)[-1]
    current = layers(Solver(Config(init="current", **common), tmp_path).model.decoder)[-1]
    assert original.weight.abs().max() <= 0.0442 + 1e-6
    assert current.weight.abs().max() > 0.2  # today's out_channels side: bound 1/sqrt(16) = 0.25


def test_2018_decoder_has_no_relu_after_its_linear_layers():
    def kinds(arch):
        return [type(m).__name__ for m in VAE(10, arch=arch).decoder.net]
    assert kinds("2020")[:4] == ["Linear", "ReLU", "Linear", "ReLU"]
    assert kinds("2018")[:3] == ["Linear", "Linear", "Unflatten"]
    assert sum(p.numel() for p in VAE(10, arch="2018").parameters()) == 498005


def test_discriminator_uses_the_default_leaky_relu_slope():
    slopes = {m.negative_slope for m in Discriminator(10).modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.01}


def test_image_grid_pads_white():
    grid = image_grid(torch.zeros(2, 3, 1, 4, 4))
    assert grid.shape == (2 * 6 + 2, 3 * 6 + 2)
    assert grid[0].min() == 255 and grid[:, 0].min() == 255 and grid[2:6, 2:6].max() == 0


def test_traversal_reconstructions_decode_a_sampled_z():
    torch.manual_seed(0)
    model = VAE(3)
    x = torch.rand(4, 1, 64, 64).round()
    noise = torch.randn(4, 3)
    rows = traversal_rows(model, x, lambda mu: noise)
    assert rows.shape == (2 + 3, 4, 1, 64, 64)
    with torch.no_grad():
        mu, logvar = model.encoder(x)
        sampled = torch.sigmoid(model.decoder(reparameterise(mu, logvar, noise)))
        at_mean = torch.sigmoid(model.decoder(mu))
        assert torch.allclose(rows[0], x) and torch.allclose(rows[1], sampled)
        assert not torch.allclose(rows[1], at_mean)
        traversed = mu[:1].repeat(4, 1)
        traversed[:, 2] = torch.linspace(-3, 3, 4)
        assert torch.allclose(rows[4], torch.sigmoid(model.decoder(traversed)))


def test_ground_truth_heatmap_is_drawn_as_the_original(tmp_path):
    pos = np.zeros((4, 4, 3))
    pos[:, :, 0] = np.arange(4)[:, None]  # z0 follows posX
    pos[:, :, 1] = -2.0 * np.arange(4)[None, :]  # z1 follows posY
    summary = dict(variance=np.array([1.0, 1.0, 0.0]), pos=pos,
                   by_scale=np.zeros((3, 6, 3)), by_rotation=np.zeros((3, 10, 3)),
                   scales=np.linspace(0.5, 1, 6), orientations=np.linspace(0, 6, 10))
    fig = save_ground_truth_plot(summary, tmp_path / "gt.png")
    assert (tmp_path / "gt.png").stat().st_size > 0
    heatmaps = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(heatmaps) == 2  # one row per active latent
    for image, j in zip(heatmaps, (0, 1), strict=True):
        assert np.array_equal(image.get_array(), pos[:, :, j])  # rows = posX, not transposed
        assert image.get_clim() == (-6.0, 3.0)  # [min, max] over all latents


def test_ground_truth_plot_names_each_latent_and_the_factor_it_tracks(tmp_path):
    from dataset import FACTOR_NAMES
    pos = np.zeros((4, 4, 2))
    summary = dict(variance=np.array([1.0, 1.0]), pos=pos, by_scale=np.zeros((3, 6, 2)),
                   by_rotation=np.zeros((3, 10, 2)), scales=np.linspace(0.5, 1, 6),
                   orientations=np.linspace(0, 6, 10))
    for name, size in zip(FACTOR_NAMES, (3, 6, 10, 4, 4), strict=True):
        summary[f"marginal_{name}"] = np.zeros((size, 2))
    summary["marginal_posX"][:, 0] = [-1.0, -0.3, 0.3, 1.0]  # z0 tracks position x
    summary["marginal_scale"][:, 1] = [-1.0, -0.6, -0.2, 0.2, 0.6, 1.0]  # z1 tracks scale
    fig = save_ground_truth_plot(summary, tmp_path / "gt.png", "Non-Syn VAE (alpha 5), step 3")
    labels = [ax.get_ylabel() for ax in fig.axes if ax.images]
    assert labels == ["z0: position x", "z1: scale"]
    assert fig.get_suptitle() == "Non-Syn VAE (alpha 5), step 3"
    assert any(ax.get_ylabel() == "posterior mean of the latent" for ax in fig.axes)  # colour bar


def test_labelled_traversal_rows_keep_the_grid_and_add_a_margin():
    from plotting import label_rows, traversal_labels
    pixels = image_grid(torch.zeros(4, 3, 1, 64, 64))
    labels = traversal_labels(2, ["position x", "none"])
    assert labels == ["original", "reconstruction", "z0: position x", "z1: none"]
    labelled = label_rows(pixels, labels)
    assert labelled.shape[0] == pixels.shape[0] and labelled.shape[1] > pixels.shape[1]
    margin = labelled.shape[1] - pixels.shape[1]
    assert np.array_equal(labelled[:, margin:, 0], pixels)  # the grid itself unchanged
    assert (labelled[:, :margin] < 128).any()  # text drawn in the margin
