"""Networks of the original thesis code: the conv VAE (dSprites and CelebA variants) and
FactorVAE's discriminator.

Layer sizes follow the original exactly (498,005 parameters for dSprites with z_dim=10); the
losses keep its scaling (summed over pixels and latents, averaged over the batch) so that
published alpha, omega and gamma values transfer. Two decoders exist: ``arch="2020"``, the final
code, and ``arch="2018"``, without the ReLUs after its two Linear layers, with which the thesis
README figures were made. ``init_as_pytorch_041`` draws weights as the original's PyTorch did.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from synergy import kl_per_latent
from utils import keep_freed_memory


class Encoder(nn.Module):
    """64x64 image -> (mu, logvar), each (B, z_dim)."""

    def __init__(self, z_dim=10, nc=1, hidden=128, hidden_relu=False):
        super().__init__()
        self.z_dim = z_dim
        self.net = nn.Sequential(
            nn.Conv2d(nc, 32, 4, 2, 1), nn.ReLU(True),  # B, 32, 32, 32
            nn.Conv2d(32, 32, 4, 2, 1), nn.ReLU(True),  # B, 32, 16, 16
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(True),  # B, 64, 8, 8
            nn.Conv2d(64, 64, 4, 2, 1), nn.ReLU(True),  # B, 64, 4, 4
            nn.Flatten(),  # B, 1024
            nn.Linear(1024, hidden),  # B, hidden (dSprites: no activation, as in the original)
            *([nn.ReLU(True)] if hidden_relu else []),
            nn.Linear(hidden, 2 * z_dim),  # B, 2z
        )

    def forward(self, x):
        stats = self.net(x).float()  # fp32 even where autocast ran the layers in bf16
        return stats[:, :self.z_dim], stats[:, self.z_dim:]


class Decoder(nn.Module):
    """(B, z_dim) latent -> (B, nc, 64, 64) logits. ``arch="2018"``: no ReLU after the two
    Linear layers (the decoder of the thesis figures; the ReLUs came on 2018-10-21)."""

    def __init__(self, z_dim=10, nc=1, hidden=128, arch="2020"):
        super().__init__()
        relu = [nn.ReLU(True)] if arch == "2020" else []
        self.net = nn.Sequential(
            nn.Linear(z_dim, hidden), *relu,  # B, hidden
            nn.Linear(hidden, 1024), *relu,  # B, 1024
            nn.Unflatten(1, (64, 4, 4)),  # B, 64, 4, 4
            nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.ReLU(True),  # B, 64, 8, 8
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(True),  # B, 32, 16, 16
            nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ReLU(True),  # B, 32, 32, 32
            nn.ConvTranspose2d(32, nc, 4, 2, 1),  # B, nc, 64, 64
        )

    def forward(self, z):
        return self.net(z).float()


def reparameterise(mu, logvar, noise):
    """z = mu + noise * sigma, the reparameterised posterior sample (noise ~ N(0, I), like mu)."""
    return mu + noise * (0.5 * logvar).exp()


class VAE(nn.Module):
    """Encoder + reparameterisation + decoder. ``forward`` returns (logits, mu, logvar, z)."""

    def __init__(self, z_dim=10, nc=1, hidden=128, hidden_relu=False, arch="2020"):
        super().__init__()
        self.encoder = Encoder(z_dim, nc, hidden, hidden_relu)
        self.decoder = Decoder(z_dim, nc, hidden, arch)

    def forward(self, x, noise=torch.randn_like):
        """``noise(mu)`` draws the standard normal noise of the reparameterised sample."""
        mu, logvar = self.encoder(x)
        z = reparameterise(mu, logvar, noise(mu))
        return self.decoder(z), mu, logvar, z


def init_as_pytorch_041(module):
    """Re-draw every Linear, Conv2d and ConvTranspose2d layer of ``module``, in module order, as
    PyTorch 0.4.1's reset_parameters did: weight and bias from U(-b, b), b = 1/sqrt(fan), fan =
    in_features (Linear) or in_channels * kh * kw (both convolutions). Current PyTorch draws
    ConvTranspose2d from the out_channels side, which makes the output layer ConvT(32 -> 1)
    5.7x wider (0.25 vs 0.044) and shows in the first ~60 steps."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            fan = layer.in_features
        elif isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            fan = layer.in_channels * math.prod(layer.kernel_size)
        else:
            continue
        bound = 1 / math.sqrt(fan)
        with torch.no_grad():
            layer.weight.uniform_(-bound, bound)
            layer.bias.uniform_(-bound, bound)
    return module


@contextmanager
def evaluating(model):
    """Run ``model`` in eval mode without autograd; its train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


class Discriminator(nn.Module):
    """FactorVAE's total-correlation discriminator: z -> 2 logits (0: joint q(z), 1: permuted)."""

    def __init__(self, z_dim=10, hidden=1000, depth=6):
        super().__init__()
        layers = []
        width = z_dim
        for _ in range(depth - 1):
            layers += [nn.Linear(width, hidden), nn.LeakyReLU(0.01, True)]  # every original
            width = hidden
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z).float()


def bernoulli_loss(logits, x):
    """dSprites: BCE with logits summed over pixels, mean over the batch."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


def gaussian_loss(logits, x):
    """CelebA: squared error of sigmoid(logits) summed over pixels, mean over the batch."""
    return F.mse_loss(torch.sigmoid(logits), x, reduction="sum") / x.shape[0]


@dataclass(frozen=True)
class ModelSpec:
    """What differs between datasets: image channels, hidden width, and the likelihood."""
    nc: int
    hidden: int
    hidden_relu: bool
    reconstruction_loss: object

    def build(self, z_dim, arch="2020"):
        return VAE(z_dim, self.nc, self.hidden, self.hidden_relu, arch)


MODEL_SPECS = {
    "dsprites": ModelSpec(nc=1, hidden=128, hidden_relu=False, reconstruction_loss=bernoulli_loss),
    "celeba": ModelSpec(nc=3, hidden=256, hidden_relu=True, reconstruction_loss=gaussian_loss),
}
# disentanglement_lib's dSprites variants: the dSprites network and Bernoulli loss, 3 channels
MODEL_SPECS.update({name: ModelSpec(nc=3, hidden=128, hidden_relu=False,
                                    reconstruction_loss=bernoulli_loss)
                    for name in ("color_dsprites", "noisy_dsprites", "scream_dsprites")})


def kl_loss(mu, logvar):
    """KL to the unit Gaussian summed over latents, mean over the batch."""
    return kl_per_latent(mu, logvar).sum(1).mean()


def permute_dims(z):
    """Shuffle every latent column independently across the batch (samples of prod_j q(z_j))."""
    keys = torch.rand(z.shape, device=z.device)
    return z.gather(0, keys.argsort(dim=0))


# The networks' activations are kept channels-last (NHWC): oneDNN and cuDNN run these
# convolutions faster so, with no reordering between layers (docs/benchmarks.md). Values are
# the same up to the order of float sums; a checkpoint stores the weights in either layout.
MEMORY_FORMAT = torch.channels_last


def build_model(config, device, memory_format=MEMORY_FORMAT):
    """The VAE of ``config`` (dataset, z_dim, decoder arch), initialised as ``config.init`` says,
    its convolution weights (and so its activations) in ``memory_format``."""
    keep_freed_memory()  # every model of a process trains or encodes with warm pages
    model = MODEL_SPECS[config.dataset].build(config.z_dim, config.arch)
    if config.init == "original":
        init_as_pytorch_041(model)
    return model.to(device, memory_format=memory_format)
