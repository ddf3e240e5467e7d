"""The Solver: owns one run (model, optimisers, data, outputs) and its training loop, and the
validated Config it runs from.

Datasets differ by a ModelSpec (channels, hidden width, likelihood); objectives (``--metric``)
differ only by their train step, one each in objectives.py (its table ``OBJECTIVES``: Non-Syn
VAE and its three updates, VAE / beta-VAE, FactorVAE, beta-TCVAE, DIP-VAE-I/II, AnnealedVAE).
The Solver builds what they share (networks, the VAE's Adam, FactorVAE's discriminator where
the table asks for it, the batches) and runs the chosen objective's step.
Every train step returns (values, best): a dict of detached 0-dim tensors (every objective's
with ``i_max``, the alpha-free synergy measure at ``measure_omega``) and the bool best-set mask.
They are read on the host only at log time, so the step never synchronises with the device.
"""
import dataclasses
import logging
import math
import signal
import threading
import time
import zipfile
from datetime import datetime
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dataset import (CELEBA_CROPS, FACTOR_NAMES, GRIDS, ORIENTATION_VALUES, SCALE_VALUES, Batches,
                     grid_axes, load_dataset)
from metrics import DEFAULT_METRICS, EVAL_SEED, METRIC_NAMES, evaluate, lookup
from model import (MODEL_SPECS, Discriminator, evaluating, init_as_pytorch_041, kl_loss,
                   reparameterise)
from monitor import VisdomMonitor
from objectives import OBJECTIVES
from plotting import image_grid, mean_activations, save_ground_truth_plot
from precision import PRECISIONS, autocast, check_precision, device_record
from synergy import kl_per_latent, synergy_penalty, worst_set_kl
from utils import (IMPLIED_SETTINGS, ConfigError, RunFolder, atomic_file, derived_seed,
                   git_commit, keep_freed_memory, load_tensors, package_versions, rng_state,
                   run_abandonable, set_rng_state)

log = logging.getLogger(__name__)

# --- the configuration ----------------------------------------------------------------------------

NONSYN = ("Test_gt", "test")
# What a reader calls each objective, and the settings that define it (the rest are unused):
# columns of objectives.OBJECTIVES, the table of every --metric
OBJECTIVE_NAMES = {metric: o.name for metric, o in OBJECTIVES.items()}
OBJECTIVE_SETTINGS = {metric: o.settings for metric, o in OBJECTIVES.items()}
LAMBDA_D_FACTOR = 10.0  # lambda_d_factor left unset: the objective's own default, else this
UPDATES = ("original", "two-step", "joint")
SAMPLES = ("no_sample", "sample")
DATASETS = ("dsprites", "celeba")
ARCHS = ("2020", "2018")  # the final decoder; the thesis figures' decoder (no ReLU after Linear)
INITS = ("original", "current")  # PyTorch 0.4.1's default initialisation, or today's
# Settings that may change when a run is resumed; everything else is fixed by the checkpoint.
RESUMABLE = ("steps", "log_interval", "save_interval", "gt_interval", "viz_on", "viz_port",
             "viz_il_iter", "viz_la_iter", "cuda", "data_dir", "eval_metrics", "eval_sample")


class Bound(NamedTuple):
    """The values a numeric setting may take: ``kind`` (int or float) within [low, high], or
    (low, high] with ``low_open``."""
    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def problem(self, value):
        """Why ``value`` is out of bounds (text), or None when it is fine."""
        if not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"must be {'>' if self.low_open else '>='} {self.low}, got {value}"
        if self.high is not None and value > self.high:
            return f"must be <= {self.high}, got {value}"
        return None


# Every numeric setting's bounds, checked for flags (run.py) and for every Config alike. The
# upper bounds of the settings that size memory (z_dim, batch_size, nb_test, eval_sample) keep a
# typo or a hand-edited checkpoint from being an allocation failure; the others are sanity.
MANY = 10**9  # steps and intervals
BOUNDS = dict(
    z_dim=Bound(int, 1, 1024), alpha=Bound(float, 0), omega=Bound(float, 0, 1, low_open=True),
    measure_omega=Bound(float, 0, 1, low_open=True), eval_sample=Bound(int, 1, 737_280),
    gamma=Bound(float, 0), beta=Bound(float, 0), lambda_od=Bound(float, 0),
    lambda_d_factor=Bound(float, 0), c_max=Bound(float, 0), c_steps=Bound(int, 1, MANY),
    c_gamma=Bound(float, 0),
    lr_VAE=Bound(float, 0, 1, low_open=True), beta1_VAE=Bound(float, 0, 1),
    beta2_VAE=Bound(float, 0, 1), lr_D=Bound(float, 0, 1, low_open=True),
    beta1_D=Bound(float, 0, 1), beta2_D=Bound(float, 0, 1),
    batch_size=Bound(int, 2, 8192), steps=Bound(int, 1, MANY), nb_test=Bound(int, 1, 100),
    seed=Bound(int, 0, 2**32 - 1), log_interval=Bound(int, 1, MANY),
    save_interval=Bound(int, 1, MANY), gt_interval=Bound(int, 1, MANY),
    viz_port=Bound(int, 1, 65535), viz_il_iter=Bound(int, 1, MANY),
    viz_la_iter=Bound(int, 1, MANY),
)
CHOICES = dict(metric=OBJECTIVES, update=UPDATES, sample=SAMPLES, arch=ARCHS, init=INITS,
               precision=PRECISIONS, dataset=DATASETS, grid=GRIDS,
               celeba_crop=tuple(CELEBA_CROPS))


@dataclasses.dataclass(frozen=True)
class Config:
    metric: str = "Test_gt"  # experiment: Test_gt/test (Non-Syn VAE), VAE, BVAE(_gt), Factor,
    #                          BTCVAE, DIPVAE1, DIPVAE2, AnnealedVAE
    update: str = "original"  # Non-Syn update: the original's, two-step at θ_t, or joint
    sample: str = "no_sample"  # synergy on the training batch, or on a second batch
    arch: str = "2020"  # decoder: the final code's, or 2018's (the thesis figures)
    init: str = "original"  # weight initialisation: PyTorch 0.4.1's, or today's
    precision: str = "fp32"  # the networks' arithmetic: fp32 (replay-exact) or bf16 autocast
    z_dim: int = 10  # latent dimensions
    alpha: float = 1.5  # weight of the synergy penalty
    omega: float = 0.8  # greedy policy: a latent joins the best set if omega * I(new) > I(old)
    measure_omega: float = 0.9  # the omega of the logged i_max, the same for every objective
    gamma: float = 6.4  # FactorVAE total-correlation weight
    beta: float = 4.0  # beta-VAE KL weight; beta-TCVAE: TC weight beta - 1
    lambda_od: float = 10.0  # DIP-VAE: weight of the squared off-diagonal covariance
    lambda_d_factor: float | None = None  # DIP-VAE: lambda_d / lambda_od (None: 10 for I, 1 for II)
    c_max: float = 25.0  # AnnealedVAE: the final KL capacity
    c_steps: int = 100000  # AnnealedVAE: steps over which the capacity rises to c_max
    c_gamma: float = 1000.0  # AnnealedVAE: weight of |KL - capacity|
    lr_VAE: float = 1e-4
    beta1_VAE: float = 0.9
    beta2_VAE: float = 0.999
    lr_D: float = 1e-4
    beta1_D: float = 0.5
    beta2_D: float = 0.9
    batch_size: int = 64
    steps: int = 300000  # optimisation steps, exactly
    dataset: str = "dsprites"
    grid: str = "full"  # dSprites factor grid: full (737,280 images) or reduced (11,520)
    celeba_crop: str = "original"  # how CelebA photos become 64x64
    data_dir: str | None = None  # where the official npz is looked for (default ./, ./datasets)
    output_dir: str = "outputs"
    run_name: str | None = None
    cuda: bool = True  # use a GPU when one is available
    nb_test: int = 9  # test images, and points per latent traversal
    seed: int = 120  # the original's hard-coded seed, now really the --seed default
    log_interval: int = 500
    save_interval: int = 2000  # traversal image + checkpoint
    gt_interval: int = 10000  # ground-truth mean-activation plot
    viz_on: bool = False
    viz_port: int = 8097
    viz_il_iter: int = 20  # gather visdom values every N steps
    viz_la_iter: int = 100  # push them every N steps
    eval_metrics: str = ",".join(DEFAULT_METRICS)  # disentanglement metrics at every gt-interval
    eval_sample: int = 10_000  # images of the final evaluation's recon / KL / ELBO / i_max sample

    def __post_init__(self):
        """Check every setting as its flag would, so that a Config built in code or read from a
        checkpoint is as valid as one from the command line; ints pass for floats."""
        if self.lambda_d_factor is None:  # disentanglement_lib's default for the DIP type
            objective = OBJECTIVES.get(self.metric)
            own = objective.defaults if objective else {}
            object.__setattr__(self, "lambda_d_factor",
                               own.get("lambda_d_factor", LAMBDA_D_FACTOR))
        for field in dataclasses.fields(self):
            name, value = field.name, getattr(self, field.name)
            if name in BOUNDS:
                bound = BOUNDS[name]
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if not numeric or (bound.kind is int and not float(value).is_integer()):
                    raise ConfigError(f"{name} must be {'a whole number' if bound.kind is int else 'a number'}"
                                      f", got {value!r}")
                object.__setattr__(self, name, bound.kind(value))
                if problem := bound.problem(value):
                    raise ConfigError(f"{name} {problem}")
            elif name in CHOICES:
                if value not in CHOICES[name]:
                    raise ConfigError(f"{name} must be one of {', '.join(CHOICES[name])}, "
                                      f"got {value!r}")
            elif field.type is bool:
                if not isinstance(value, bool):
                    raise ConfigError(f"{name} must be True or False, got {value!r}")
            elif name == "eval_metrics":
                unknown = [n for n in self.metric_names if n not in METRIC_NAMES]
                if not isinstance(value, str) or unknown:
                    raise ConfigError(f"eval_metrics must name metrics from "
                                      f"{', '.join(METRIC_NAMES)}, got {value!r}")
            elif not (isinstance(value, str) or (value is None and field.default is None)):
                raise ConfigError(f"{name} must be text, got {value!r}")
        if self.run_name is not None:
            name = self.run_name
            if (not name.strip() or name.startswith(".") or name != name.strip()
                    or any(c in name for c in "/\\\0") or not name.isprintable()
                    or len(name.encode()) > 200):
                raise ConfigError(f"run_name (--run-name) must be a visible single folder name: "
                                  f"not blank, not starting with '.', no leading or trailing "
                                  f"space, without '/', '\\' or control characters, at most 200 "
                                  f"bytes; got {name!r}")

    def to_dict(self):
        return dataclasses.asdict(self)

    @property
    def metric_names(self):
        return tuple(n for n in self.eval_metrics.split(",") if n)

    @classmethod
    def from_stored(cls, stored, where):
        """The Config of stored settings (a checkpoint's, config.json's), checked like flags:
        every setting present, none unknown, each of the right type and within its bounds."""
        if not isinstance(stored, dict):
            raise ConfigError(f"{where} holds no settings")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(stored) - names), sorted(names - set(stored))
        if unknown or missing:
            raise ConfigError(f"{where} does not hold this code's settings "
                              f"(unknown: {', '.join(unknown) or 'none'}; missing: "
                              f"{', '.join(missing) or 'none'})")
        try:
            return cls(**stored)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None




def objective_label(settings):
    """A reader's name for a run's objective from its settings (a Config's dict, or part of
    one: missing settings are the defaults), e.g. "Non-Syn VAE (alpha 5, omega 0.9)",
    "FactorVAE (gamma 6.4)", "VAE"; a non-default update, sample, decoder or precision is named
    too ("VAE (arch 2018)")."""
    metric = settings.get("metric", Config.metric)
    default = Config(metric=metric if metric in OBJECTIVES else Config.metric)
    get = lambda name: settings.get(name, getattr(default, name))  # noqa: E731
    parts = [f"{name} {get(name):g}" for name in OBJECTIVE_SETTINGS[metric]]
    if metric in NONSYN:
        parts += [f"{name} {get(name)}" for name in ("update", "sample")
                  if get(name) != getattr(default, name)]
    if get("arch") != default.arch:
        parts.append(f"arch {get('arch')}")
    if get("precision") != default.precision:
        parts.append(get("precision"))
    return OBJECTIVE_NAMES[metric] + (f" ({', '.join(parts)})" if parts else "")


class Diverged(RuntimeError):
    """Training produced a non-finite loss or weight; the message names the step and the term."""


class _Bad(Exception):
    """A checkpoint field that is not what this code writes (the message names it)."""


def _number(value, name, whole=False, low=0, high=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            whole and not isinstance(value, int)) or not math.isfinite(value):
        raise _Bad(f"{name} must be a finite {'whole ' if whole else ''}number, got {value!r}")
    if value < low or (high is not None and value > high):
        raise _Bad(f"{name} must lie in [{low}, {high if high is not None else 'inf'}], got "
                   f"{value!r}")


def _tensor(value, name, shape, dtype=torch.float32, finite=True):
    if not isinstance(value, torch.Tensor):
        raise _Bad(f"{name} must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
        raise _Bad(f"{name} must be a {dtype} tensor of shape {tuple(shape)}, got "
                   f"{value.dtype} {tuple(value.shape)}")
    if finite and value.is_floating_point() and not value.isfinite().all():
        raise _Bad(f"{name} holds NaN or infinite values")


def _state_dict(stored, template, name):
    if not isinstance(stored, dict) or set(stored) != set(template):
        found = sorted(map(str, stored)) if isinstance(stored, dict) else type(stored).__name__
        raise _Bad(f"{name} must hold the tensors {sorted(template)[:3]}..., got {found}"[:300])
    for key, tensor in template.items():
        _tensor(stored[key], f"{name}[{key}]", tensor.shape, tensor.dtype)


def _optimiser(stored, optimiser, name):
    """An optimiser's state dict against a fresh ``optimiser`` of the same parameters: the same
    groups and settings, and per parameter its step and moments of the parameter's shape."""
    template = optimiser.state_dict()
    if not isinstance(stored, dict) or set(stored) != {"state", "param_groups"}:
        raise _Bad(f"{name} must hold 'state' and 'param_groups'")
    groups, fresh = stored["param_groups"], template["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(fresh):
        raise _Bad(f"{name}.param_groups must be a list of {len(fresh)} group(s)")
    for i, (group, want) in enumerate(zip(groups, fresh, strict=True)):
        if not isinstance(group, dict):
            raise _Bad(f"{name}.param_groups[{i}] must be a dict")
        for key in ("params", "lr", "betas", "eps"):
            value, wanted = group.get(key), want[key]
            as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
            if as_list(value) != as_list(wanted):
                raise _Bad(f"{name}.param_groups[{i}].{key} must be {want[key]!r} (the run's "
                           f"settings), got {group.get(key)!r}")
    params = [p for group in optimiser.param_groups for p in group["params"]]
    state = stored["state"]
    if not isinstance(state, dict) or not set(state) <= set(range(len(params))):
        raise _Bad(f"{name}.state must map parameter indices 0..{len(params) - 1} to their "
                   f"state")
    adam041 = isinstance(optimiser, Adam041)
    for index, entry in state.items():
        where = f"{name}.state[{index}]"
        if not isinstance(entry, dict) or set(entry) != {"step", "exp_avg", "exp_avg_sq"}:
            raise _Bad(f"{where} must hold step, exp_avg and exp_avg_sq")
        if adam041:
            _number(entry["step"], f"{where}.step", whole=True, low=1)
        else:
            _tensor(entry["step"], f"{where}.step", ())
            _number(entry["step"].item(), f"{where}.step", low=1)
        shape = params[index].shape
        _tensor(entry["exp_avg"], f"{where}.exp_avg", shape)
        _tensor(entry["exp_avg_sq"], f"{where}.exp_avg_sq", shape)
        if (entry["exp_avg_sq"] < 0).any():
            raise _Bad(f"{where}.exp_avg_sq holds negative values")


def check_checkpoint(checkpoint, config):
    """Every stored field of a training checkpoint against what this code writes for
    ``config``: types, ranges, the tensors' shapes and dtypes against the networks ``config``
    builds, the optimisers' settings, the RNG state. Raises ConfigError naming the first field
    that is not, before anything is built on it or any file is touched."""
    required = {"step", "elapsed", "config", "model", "optim", "best_counts", "rng", "format"}
    optional = {"eval_pending"}  # format 1 had none
    if OBJECTIVES[config.metric].discriminator:
        required |= {"D", "optim_D"}
    try:
        if missing := sorted(required - set(checkpoint)):
            raise _Bad(f"missing {', '.join(missing)}")
        if unknown := sorted(map(str, set(checkpoint) - required - optional)):
            raise _Bad(f"unknown entries {', '.join(unknown)} (not written by this code)")
        _number(checkpoint["step"], "step", whole=True, high=config.steps)
        _number(checkpoint["elapsed"], "elapsed")
        if not isinstance(checkpoint.get("eval_pending", False), bool):
            raise _Bad(f"eval_pending must be True or False, got {checkpoint['eval_pending']!r}")
        with torch.device("cpu"):
            model = MODEL_SPECS[config.dataset].build(config.z_dim, config.arch)
            _state_dict(checkpoint["model"], model.state_dict(), "model")
            _optimiser(checkpoint["optim"], vae_optimiser(model, config), "optim")
            if OBJECTIVES[config.metric].discriminator:
                D = Discriminator(config.z_dim)
                _state_dict(checkpoint["D"], D.state_dict(), "D")
                _optimiser(checkpoint["optim_D"], discriminator_optimiser(D, config),
                           "optim_D")
        counts = checkpoint["best_counts"]
        _tensor(counts, "best_counts", (config.z_dim,))
        if (counts < 0).any() or (counts > checkpoint["step"]).any() or (
                counts != counts.round()).any():
            raise _Bad("best_counts must be whole numbers of steps between 0 and the step")
        rng = checkpoint["rng"]
        if not isinstance(rng, dict) or "torch" not in rng or not set(rng) <= {"torch", "cuda"}:
            raise _Bad("rng must hold the 'torch' generator state (and 'cuda' on a GPU)")
        for key, value in rng.items():
            if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or \
                    value.dim() != 1:
                raise _Bad(f"rng.{key} must be a 1-d uint8 tensor")
        try:
            torch.Generator().set_state(rng["torch"])  # a scratch generator: nothing global
        except RuntimeError:
            raise _Bad("rng.torch is not a generator state torch accepts") from None
    except _Bad as err:
        raise ConfigError(f"the checkpoint's {err}; the file was edited or written by other "
                          f"code. Nothing was changed") from None


def stored_run(folder):
    """(checkpoint, Config) of the run in ``folder``, validated before anything is built or
    written: a readable checkpoint of a known format whose tensors match their checksum, stored
    settings checked like flags, and the same run as config.json describes (settings that a
    resume may change aside)."""
    folder.check_run()
    folder.check_no_links()
    checkpoint = folder.load_checkpoint()
    config = Config.from_stored(checkpoint["config"], f"the checkpoint of {folder}")
    try:
        check_checkpoint(checkpoint, config)
    except ConfigError as err:
        raise ConfigError(f"{folder.checkpoint_path}: {err}") from None
    started = folder.read_config().get("config")
    if started is not None:
        started = {**IMPLIED_SETTINGS[1], **started}  # written before a setting existed
        differ = sorted(k for k, v in config.to_dict().items()
                        if k not in RESUMABLE and started.get(k) != v)
        if differ:
            raise ConfigError(f"the checkpoint in {folder} does not belong to the run its "
                              f"config.json describes (they differ in {', '.join(differ)}); "
                              f"nothing was changed")
    return checkpoint, config


WEIGHTS = "model.pt"  # a run's final weights alone (figures.py writes misc/runs/<run>/model.pt)


def stored_weights(folder):
    """({"step", "model"}, Config) of a folder that holds a run's config.json and its model
    weights alone (``WEIGHTS``, no checkpoint): what evaluate.py needs to score a run that
    was not trained here. Checked like a checkpoint's model."""
    folder.check_no_links()
    started = folder.read_config().get("config")
    if not isinstance(started, dict):
        raise ConfigError(f"{folder} has no {folder.CONFIG} with the run's settings")
    config = Config.from_stored({**IMPLIED_SETTINGS[1], **started}, f"{folder}/{folder.CONFIG}")
    path = folder.path / WEIGHTS
    saved = load_tensors(path, "model weights file")
    try:
        if not isinstance(saved, dict) or set(saved) != {"step", "model"}:
            raise _Bad("must hold 'step' and 'model'")
        _number(saved["step"], "step", whole=True, high=config.steps)
        with torch.device("cpu"):
            template = MODEL_SPECS[config.dataset].build(config.z_dim, config.arch)
        _state_dict(saved["model"], template.state_dict(), "model")
    except _Bad as err:
        raise ConfigError(f"{path}: {err}") from None
    return saved, config


def run_metadata(config, data, device):
    """What config.json records besides the settings: data source and size, the device asked
    for and used (``precision.device_record``), versions, commit."""
    return dict(config=config.to_dict(), data_source=data.source, n_images=len(data),
                device=device_record(config, device),
                versions=package_versions(), git_commit=git_commit(),
                factors=list(FACTOR_NAMES) if data.has_factors else None)


def pick_device(config):
    """The device ``config`` trains on; refuses a precision that device cannot run well."""
    device = torch.device("cuda" if config.cuda and torch.cuda.is_available() else "cpu")
    check_precision(config.precision, device)
    return device


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
    """The VAE's optimiser: 0.4.1's Adam for the original update, today's otherwise."""
    adam = Adam041 if config.metric in NONSYN and config.update == "original" \
        else torch.optim.Adam
    return adam(model.parameters(), lr=config.lr_VAE, betas=(config.beta1_VAE, config.beta2_VAE))


def discriminator_optimiser(D, config):
    return torch.optim.Adam(D.parameters(), lr=config.lr_D, betas=(config.beta1_D, config.beta2_D))


# --- the Solver -----------------------------------------------------------------------------------

class Solver:
    """One run. ``batches`` (an object with ``train(step)`` and ``partner(step)`` returning
    image batches) and ``noise`` (``noise(mu)``: standard normal noise like mu, for every
    reparameterised sample) default to the run's own data and RNG; a replay hands in its own."""

    def __init__(self, config, folder, checkpoint=None, batches=None, noise=torch.randn_like,
                 memory_format=MEMORY_FORMAT):
        self.config = c = config
        self.folder = folder if isinstance(folder, RunFolder) else RunFolder(folder)
        self.device = pick_device(c)
        torch.manual_seed(c.seed)

        self.data = load_dataset(c.dataset, c.data_dir, c.grid, c.celeba_crop).to(self.device)
        if not self.data.has_factors:
            log.info("%s has no ground-truth factors: ground-truth plots and disentanglement "
                     "metrics are skipped", c.dataset)
        self.model = build_model(c, self.device, memory_format)
        self.autocast = lambda: autocast(self.device, c.precision)  # around forward passes only
        self.reconstruction_loss = MODEL_SPECS[c.dataset].reconstruction_loss
        self.objective = OBJECTIVES[c.metric]
        self.optim = vae_optimiser(self.model, c)
        self.D = self.optim_D = None
        if self.objective.discriminator:
            self.D = Discriminator(c.z_dim).to(self.device)
            if c.init == "original":
                init_as_pytorch_041(self.D)
            self.optim_D = discriminator_optimiser(self.D, c)
        self.batches = batches or Batches(self.data, c.batch_size, c.seed, self.device)
        self.noise = noise
        picker = torch.Generator().manual_seed(c.seed)
        self.test_index = torch.cat([torch.zeros(1, dtype=torch.long),
                                     torch.randint(len(self.data), (c.nb_test - 1,), generator=picker)])

        self.step = 0
        self.elapsed = 0.0
        self.checkpoint_step = None  # the step of the checkpoint on disk, if any
        self.eval_pending = False  # an evaluation due at this step has not finished yet
        self.best_counts = torch.zeros(c.z_dim, device=self.device)  # steps each latent was in B
        # Device-side watch for non-finite losses: the first step with one (0: none yet) and
        # which terms; read on the host only at log / save / evaluation boundaries.
        self._first_bad = torch.zeros((), dtype=torch.long, device=self.device)
        self._bad_terms, self._term_names = None, None
        if checkpoint is not None:
            self.load_state(checkpoint)
        self.viz = None
        if c.viz_on:
            self.viz = VisdomMonitor(self.folder.name, c.viz_port, c.viz_il_iter, c.viz_la_iter,
                                     c.z_dim)
        self._stop_signal = None

    # --- what the objectives' steps (objectives.py) use -----------------------------------

    def elbo_terms(self):
        """Forward pass of the step's training batch: (recon, kl, mu, logvar, z)."""
        x = self.batches.train(self.step)
        with self.autocast():
            logits, mu, logvar, z = self.model(x, self.noise)
        return self.reconstruction_loss(logits, x), kl_loss(mu, logvar), mu, logvar, z

    def penalty_posterior(self, mu, logvar):
        """The posterior (mu, logvar) that feeds the synergy penalty: the training batch's own,
        or with --sample sample a forward pass of the partner batch at the current parameters.
        That pass draws its sample's noise like the original's ``VAE(x2, decode=False)``, so
        the noise stream stays in step with the original's."""
        if self.config.sample == "no_sample":
            return mu, logvar
        with self.autocast():
            mu, logvar = self.model.encoder(self.batches.partner(self.step))
        self.noise(mu)
        return mu, logvar

    def synergy_gradient(self, mu, logvar, retain_graph=False):
        """(syn, best, d syn / d encoder parameters) of the penalty on this posterior."""
        syn, best = synergy_penalty(mu, logvar, self.config.omega, self.config.alpha)
        grads = torch.autograd.grad(syn, list(self.model.encoder.parameters()),
                                    retain_graph=retain_graph)
        return syn, best, grads

    def measured(self, values, mu, logvar, best):
        """``values`` plus ``i_max``: the KL of the worst set of the training batch's posterior
        at ``measure_omega``, alpha-free and defined alike for every objective (``syn`` is the
        run's own alpha * I_max at its omega). The run's best set is reused when it is the same
        set."""
        c = self.config
        kl = kl_per_latent(mu.detach(), logvar.detach()).mean(0)
        if c.omega == c.measure_omega and (c.metric not in NONSYN or c.sample == "no_sample"):
            i_max = kl.masked_fill(best, 0.0).sum()
        else:
            i_max = worst_set_kl(kl, c.measure_omega)[0]
        return dict(values, i_max=i_max), best

    def train_step(self):
        """One optimisation step of the run's objective (objectives.OBJECTIVES)."""
        return self.objective.step(self)

    # --- the loop ----------------------------------------------------------------------------

    def train(self):
        """Train up to config.steps. Returns True when finished, False when stopped by a signal."""
        c = self.config
        self.model.train()
        start_step, started = self.step, time.perf_counter() - self.elapsed
        handlers = self._install_signal_handlers()
        log_file = self.folder.open_log()
        try:
            if self.eval_pending:  # an evaluation the last session was stopped in: redo it
                self._evaluate(log_file)
                if not self.eval_pending:
                    self.save_checkpoint()
            with logging_redirect_tqdm(), tqdm(total=c.steps, initial=self.step, unit="step",
                                               dynamic_ncols=True, desc="training") as bar:
                while self.step < c.steps and self._stop_signal is None:
                    values, best = self.advance()
                    bar.update(1)
                    self.elapsed = time.perf_counter() - started
                    self.eval_pending = self.data.has_factors and (
                        self.step % c.gt_interval == 0 or self.step == c.steps)
                    if self.step % c.log_interval == 0 or self.step == c.steps:
                        self._log(log_file, values, best)
                    if self.eval_pending:
                        self._evaluate(log_file)
                    if self.step % c.save_interval == 0 or self.step == c.steps:
                        self.save_checkpoint()  # after the evaluation: it records whether it ran
                        self.save_traversal()
        finally:
            try:
                self.folder.close_log(log_file)
            finally:
                self._restore_signal_handlers(handlers)
        if self._stop_signal is not None:
            self.save_checkpoint()
            name = signal.Signals(self._stop_signal).name
            log.warning("%s at step %d: checkpoint saved in %s. Resume with:\n  python run.py "
                        "--resume %s", name, self.step, self.folder.checkpoint_path, self.folder)
        if self.viz is not None:  # the last points, waited for a few seconds at most
            self.viz.close()
        if self._stop_signal is not None:
            return False
        log.info("Finished %d steps in %.1f s (%d this session); outputs in %s", self.step,
                 self.elapsed, self.step - start_step, self.folder)
        return True

    def advance(self):
        """One step of the loop: the objective's update, then the step count, best-set counts
        and visdom gathering (device-side only). Returns the step's (values, best)."""
        values, best = self.train_step()
        self.step += 1
        self._watch_finite(values)
        self.best_counts += best
        if self.viz is not None:
            self.viz.gather(self.step, values, self.best_counts / self.step)
        return values, best

    def _watch_finite(self, values):
        """Remember, on the device, the first step whose values hold a NaN or inf."""
        finite = torch.stack([v.detach().float() for v in values.values()]).isfinite()
        if self._bad_terms is None:
            self._term_names, self._bad_terms = list(values), torch.zeros_like(finite)
        first = (self._first_bad == 0) & ~finite.all()
        self._first_bad = torch.where(first, self.step, self._first_bad)
        self._bad_terms = torch.where(first, ~finite, self._bad_terms)

    def check_finite(self):
        """Raise Diverged if a loss went non-finite (one host read: call at boundaries)."""
        step = int(self._first_bad)
        if not step:
            return
        terms = [n for n, bad in zip(self._term_names, self._bad_terms.tolist(), strict=True)
                 if bad]
        kept = (f"the last checkpoint, step {self.checkpoint_step}, is kept"
                if self.checkpoint_step is not None else "no checkpoint was written")
        raise Diverged(f"{' and '.join(terms)} became NaN or infinite at step {step}; training "
                       f"stopped and {kept}. Try a lower --lr_VAE (or a smaller --alpha / "
                       f"--gamma) in a new run")

    def _log(self, log_file, values, best):
        self.check_finite()
        row = {name: float(v) for name, v in values.items()}
        best = best.cpu()
        record = dict(step=self.step, **row,
                      best=best.nonzero().flatten().tolist(), worst=(~best).nonzero().flatten().tolist(),
                      best_freq=[round(f, 6) for f in (self.best_counts / self.step).tolist()],
                      seconds=round(self.elapsed, 3))
        self.folder.write_record(log_file, "train", record)
        terms = " | ".join(f"{k} {v:.4g}" for k, v in row.items())
        log.info("step %d/%d | %s | best %s | %.1f s", self.step, self.config.steps, terms,
                 record["best"], self.elapsed)

    def _evaluate(self, log_file):
        """The evaluation due at this step; ``eval_pending`` stays set when a signal stops it,
        so that the checkpoint records it and the resumed run redoes it first."""
        self.check_finite()
        started = time.perf_counter()
        results = evaluate_representation(self.model, self.data, self.config, self.folder,
                                          self.step, self.config.metric_names,
                                          should_stop=lambda: self._stop_signal is not None)
        if results is None:
            return
        final = self.step == self.config.steps
        measures = sample_measures(self.model, self.data, self.config) if final else None
        self.eval_pending = False
        if results:
            self.folder.write_record(log_file, "eval", dict(
                step=self.step, scores={n: r["score"] for n, r in results.items()},
                eval_seconds=round(time.perf_counter() - started, 3)))
        if final:
            log_measures(self.step, measures)
            self.folder.append_evaluation(evaluation_report(self.step, self.data, results,
                                                            "end of training", measures))

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def stop(signum, frame):
            self._stop_signal = signum
            self._restore_signal_handlers(previous)  # a second Ctrl-C ends at once

        for s in previous:
            signal.signal(s, stop)
        return previous

    @staticmethod
    def _restore_signal_handlers(handlers):
        for s, handler in handlers.items():
            signal.signal(s, handler)

    # --- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self):
        """Write the checkpoint, unless a loss or a weight went non-finite (Diverged): the last
        good checkpoint is never replaced by a broken one."""
        self.check_finite()
        weights = list(self.model.parameters()) + (list(self.D.parameters()) if self.D else [])
        if not torch.stack([p.isfinite().all() for p in weights]).all():
            kept = (f"the last checkpoint, step {self.checkpoint_step}, is kept"
                    if self.checkpoint_step is not None else "no checkpoint was written")
            raise Diverged(f"a weight became NaN or infinite by step {self.step}; training "
                           f"stopped and {kept}. Try a lower --lr_VAE in a new run")
        state = dict(step=self.step, elapsed=self.elapsed, eval_pending=self.eval_pending,
                     config=self.config.to_dict(),
                     model=self.model.state_dict(), optim=self.optim.state_dict(),
                     best_counts=self.best_counts, rng=rng_state(self.device))
        if self.D is not None:
            state.update(D=self.D.state_dict(), optim_D=self.optim_D.state_dict())
        self.folder.save_checkpoint(state)
        self.checkpoint_step = self.step

    def load_state(self, state):
        self.model.load_state_dict(state["model"])
        self.optim.load_state_dict(state["optim"])
        if self.D is not None:
            self.D.load_state_dict(state["D"])
            self.optim_D.load_state_dict(state["optim_D"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.eval_pending = bool(state.get("eval_pending", False))  # format 1 has none
        self.checkpoint_step = self.step
        self.best_counts = state["best_counts"].to(self.device)
        set_rng_state(state["rng"], self.device)

    # --- figures -----------------------------------------------------------------------------

    TRAVERSAL_STREAM = 2  # the traversal's noise: its own generator, not the training RNG

    def save_traversal(self):
        """alpha_<alpha>_traversal_<step>.png (see ``traversal_rows``). The reconstructions'
        noise comes from a generator seeded with (seed, step), so drawing a traversal leaves the
        training stream, and with it resume, untouched."""
        c = self.config
        x = self.data.images(self.test_index.to(self.device))  # T, ch, 64, 64
        generator = torch.Generator(self.device).manual_seed(
            derived_seed(c.seed, self.TRAVERSAL_STREAM, self.step))
        rows = traversal_rows(self.model, x, lambda mu: torch.randn(
            mu.shape, generator=generator, device=mu.device))
        pixels = image_grid(rows.cpu())
        with atomic_file(self.folder.traversal_path(c.alpha, self.step)) as f:
            Image.fromarray(pixels).save(f, format="PNG")
        if self.viz is not None:
            self.viz.image(pixels, self.step)


def traversal_rows(model, x, noise):
    """The original's traversal grid as images in [0, 1], (2 + z_dim, T, ch, 64, 64): row 1 the
    T test images ``x``, row 2 their reconstructions decoded from a sampled z (``noise(mu)``, as
    the original), then one row per latent j: test image 0's mean with z_j set to each of
    linspace(-3, 3, T)."""
    n = len(x)
    with evaluating(model):
        mu, logvar = model.encoder(x)  # T, z
        z_dim = mu.shape[1]
        recon = torch.sigmoid(model.decoder(reparameterise(mu, logvar, noise(mu))))
        z = mu[:1].repeat(z_dim * n, 1).view(z_dim, n, z_dim)
        z[torch.arange(z_dim), :, torch.arange(z_dim)] = torch.linspace(-3, 3, n, device=x.device)
        traversal = torch.sigmoid(model.decoder(z.view(-1, z_dim)))
    return torch.cat([x, recon, traversal]).view(z_dim + 2, n, *x.shape[1:])


# --- a trained representation: evaluation without a Solver ---------------------------------------

@dataclasses.dataclass
class Trained:
    """A model and its data rebuilt from a stored config, for scripts that evaluate or draw
    (evaluate.py, figures.py, benchmark.py): no optimisers, no discriminator, no run loop."""
    config: Config
    model: torch.nn.Module
    data: object
    device: torch.device
    step: int = 0

    @classmethod
    def build(cls, config, checkpoint=None):
        """The model of ``config`` with the checkpoint's weights (or freshly initialised)."""
        device = pick_device(config)
        torch.manual_seed(config.seed)
        model = build_model(config, device)
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
        data = load_dataset(config.dataset, config.data_dir, config.grid,
                            config.celeba_crop).to(device)
        return cls(config, model, data, device, checkpoint["step"] if checkpoint else 0)

    @classmethod
    def load(cls, folder, **changes):
        """The run in ``folder`` at its checkpoint, visdom off; ``changes`` override stored
        settings."""
        checkpoint, config = stored_run(folder)
        return cls.build(dataclasses.replace(config, viz_on=False, **changes), checkpoint)

    def evaluate(self, folder, metric_names, plot=True):
        return evaluate_representation(self.model, self.data, self.config, folder, self.step,
                                       metric_names, plot)


def encode_all(model, data, should_stop=None, batch_size=None, precision="fp32"):
    """Posterior means of every image in dataset order: float32 array (N, z_dim), or None when
    ``should_stop()`` turns true on the way (a Ctrl-C should not wait for the whole grid).
    ``precision`` bf16 runs the encoder under autocast (the means come back in fp32).

    On the CPU fp32 wants small batches (96 with channels-last weights; 96-384 within noise of
    each other, 512 and more slower on 2 cores) and bf16 on AMX larger ones (256: 29-34 s for
    the full grid on 2 cores, 96: 45 s); a GPU wants large ones. The batch size does not change
    the fp32 means (identical for 96-512). The means are gathered on the device and copied to
    the host once."""
    device = next(model.parameters()).device
    batch_size = batch_size or (4096 if device.type == "cuda" else
                                256 if precision == "bf16" else 96)
    codes = torch.empty(len(data), model.encoder.z_dim, device=device)
    with evaluating(model), autocast(device, precision):
        for start in range(0, len(data), batch_size):
            if should_stop is not None and should_stop():
                return None
            index = torch.arange(start, min(start + batch_size, len(data)), device=device)
            codes[start:start + len(index)] = model.encoder(data.images(index))[0]
    return codes.cpu().numpy()


def grid_summary(codes, data, z_dim):
    """The ground-truth plot's numbers (``plotting.mean_activations``) of the grid's codes."""
    axes = grid_axes(data.grid)
    return mean_activations(codes.reshape(*data.factor_sizes, z_dim),
                            scales=SCALE_VALUES[axes[1]], orientations=ORIENTATION_VALUES[axes[2]])


SAMPLE_MEASURES = ("recon", "kl", "elbo", "i_max")  # of ``sample_measures``, every objective
MEASURE_LABELS = dict(recon="recon", kl="KL", elbo="ELBO", i_max="I_max")
SAMPLE_PROTOCOL = ("mean over a fixed sample of images (drawn without replacement with "
                   "eval_seed): one forward pass each, recon decoded from one sample z ~ q(z|x) "
                   "(noise from eval_seed), KL analytic, elbo = -(recon + kl), i_max the KL of "
                   "the worst set of the sample-mean KL per latent at measure_omega")


def sample_measures(model, data, config, seed=EVAL_SEED, batch_size=500):
    """recon, kl, elbo and i_max of ``model`` over a fixed sample of ``config.eval_sample``
    images of ``data`` (SAMPLE_PROTOCOL): the same images and noise for every run with the same
    data and sample size, whatever its objective."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data), generator=generator)[:config.eval_sample]
    noise = torch.randn(len(index), config.z_dim, generator=generator)
    reconstruction_loss = MODEL_SPECS[config.dataset].reconstruction_loss
    recon = torch.zeros((), dtype=torch.float64, device=device)
    kl = torch.zeros(config.z_dim, dtype=torch.float64, device=device)
    with evaluating(model):
        for start in range(0, len(index), batch_size):
            x = data.images(index[start:start + batch_size].to(device))
            with autocast(device, config.precision):
                mu, logvar = model.encoder(x)
                z = reparameterise(mu, logvar, noise[start:start + len(x)].to(device))
                logits = model.decoder(z).float()
            recon += reconstruction_loss(logits, x).double() * len(x)
            kl += kl_per_latent(mu, logvar).double().sum(0)
    recon, kl = (recon / len(index)).item(), (kl / len(index))
    i_max = worst_set_kl(kl, config.measure_omega)[0].item()
    kl_total = kl.sum().item()
    return dict(recon=recon, kl=kl_total, elbo=-(recon + kl_total), i_max=i_max,
                kl_per_latent=[round(k, 6) for k in kl.tolist()], n_images=len(index),
                measure_omega=config.measure_omega, protocol=SAMPLE_PROTOCOL)


def log_measures(step, measures):
    log.info("step %d | evaluation sample of %d images: recon %.2f | KL %.2f | ELBO %.2f | "
             "i_max %.3f (omega %g)", step, measures["n_images"], measures["recon"],
             measures["kl"], measures["elbo"], measures["i_max"], measures["measure_omega"])


def evaluate_representation(model, data, config, folder, step, metric_names, plot=True,
                            should_stop=None):
    """Encode the whole grid once; from those means draw the ground-truth plot (unless the run
    already has it) and compute the disentanglement metrics. Returns {metric: result}, or None
    when interrupted."""
    started = time.perf_counter()
    plot_path = folder.gt_plot_path(config.alpha, step)
    summary_path = folder.gt_summary_path(config.alpha, step)
    # A good plot is never redrawn over; a missing or unreadable one (a cut-short write) is.
    plot_ok, summary_ok = readable_png(plot_path), readable_npz(summary_path)
    plot = plot and not (plot_ok and summary_ok)
    if not plot and not metric_names:
        return {}  # nothing that needs the grid's codes
    codes = encode_all(model, data, should_stop, precision=config.precision)
    if codes is None:
        log.warning("evaluation at step %d skipped: interrupted", step)
        return None
    sizes = data.factor_sizes
    if plot:
        summary = grid_summary(codes, data, config.z_dim)
        if not summary_ok:
            with atomic_file(summary_path) as f:
                np.savez(f, **summary)
        if not plot_ok:
            with atomic_file(plot_path) as f:
                save_ground_truth_plot(summary, f, f"{objective_label(config.to_dict())}, step "
                                                   f"{step:,}")
    encoded = time.perf_counter()
    score = lambda: evaluate(lookup(codes, sizes), sizes, metric_names)  # noqa: E731
    # Metrics can take minutes (DCI fits thousands of trees): during training they run in a
    # child process that a Ctrl-C or SIGTERM abandons at once.
    results = score() if should_stop is None or not metric_names else run_abandonable(
        score, should_stop)
    if results is None:
        log.warning("evaluation at step %d stopped: interrupted", step)
        return None
    if results:
        log.info("step %d | %s | encoding %.1f s, metrics %.1f s", step,
                 " | ".join(f"{name} {r['score']:.3f}" for name, r in results.items()),
                 encoded - started, time.perf_counter() - encoded)
    return results


def readable_png(path):
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def readable_npz(path):
    try:
        with np.load(path) as arrays:
            [arrays[k] for k in arrays.files]
        return True
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return False


def evaluation_report(step, data, results, source, measures=None):
    """One metrics.json entry: the scores with their protocols, the evaluation sample's
    ``measures`` (``sample_measures``), the data and library versions."""
    return dict(step=step, source=source, scores=results, measures=measures, eval_seed=EVAL_SEED,
                data=dict(source=data.source, grid=data.grid, factors=list(FACTOR_NAMES),
                          factor_sizes=list(data.factor_sizes), representation="posterior mean"),
                versions=package_versions(), at=datetime.now().isoformat(timespec="seconds"))
