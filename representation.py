"""A trained representation, apart from training: a model rebuilt from a stored run
(``Trained``), the encoding pass over a dataset, the evaluation sample's measures (recon, KL,
ELBO, i_max), the ground-truth summary and plot, the disentanglement scores and the report
metrics.json keeps. The precision of every pass is passed explicitly (a run's own, from its
Config)."""
import argparse
import dataclasses
import logging
import time
import traceback
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from config import Config, objective_label
from dataset import (FACTOR_DATASETS, FACTOR_NAMES, ORIENTATION_VALUES, SCALE_VALUES,
                     DatasetError, grid_axes, load_dataset)
from metrics import EVAL_SEED, evaluate, lookup, metric_list
from model import MODEL_SPECS, build_model, evaluating, reparameterise
from plotting import image_grid, mean_activations, save_ground_truth_plot
from precision import autocast, pick_device, stored_run_precision
from runfolder import RunFolder, stored_model
from synergy import kl_per_latent, worst_set_kl
from utils import (ConfigError, OutOfMemory, atomic_file, derived_seed, memory_failure,
                   out_of_memory, package_versions, run_abandonable)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Trained:
    """A model and its data rebuilt from a stored config, for scripts that evaluate or draw
    (evaluate.py, figures.py, benchmark.py): no optimisers, no discriminator, no run loop."""
    config: Config
    model: torch.nn.Module
    data: object
    device: torch.device
    step: int = 0
    run_precision: str = ""  # load: the precision the run itself trained at

    @classmethod
    def build(cls, config, checkpoint=None, device=None, datasets=None):
        """The model of ``config`` with the checkpoint's weights (or freshly initialised), on
        ``device`` (default: the one ``config`` asks for). ``datasets``: a dict kept between
        calls, so that runs on the same data load it once."""
        device = device or pick_device(config)
        torch.manual_seed(config.seed)
        model = build_model(config, device)
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
        key = (config.dataset, config.data_dir, config.grid, config.celeba_crop,
               config.scream_image, str(device))
        data = (datasets or {}).get(key)
        if data is None:
            data = load_dataset(config.dataset, config.data_dir, config.grid,
                                config.celeba_crop, config.scream_image).to(device)
            if datasets is not None:
                datasets[key] = data
        return cls(config, model, data, device, checkpoint["step"] if checkpoint else 0)

    @classmethod
    def load(cls, folder, tool=None, datasets=None, **changes):
        """The run in ``folder`` (a RunFolder or a path) at its checkpoint, or a folder of final
        weights (misc/runs/<run>), visdom off; ``changes`` override stored settings
        (``cuda=False``). With ``tool`` (evaluate.py, figures.py) the precision is chosen as
        ``stored_run_precision`` chooses it for that tool, ``changes["precision"]`` being its
        --precision (None: the run's own). ``datasets`` as for ``build``."""
        if not isinstance(folder, RunFolder):
            folder = RunFolder(Path(folder))
        checkpoint, config = stored_model(folder)
        own = config.precision
        if tool is not None:
            given = changes.pop("precision", None)
            config = dataclasses.replace(config, viz_on=False, **changes)
            changes = dict(precision=stored_run_precision(config, given, tool))
        trained = cls.build(dataclasses.replace(config, viz_on=False, **changes), checkpoint,
                            datasets=datasets)
        trained.run_precision = own
        return trained

    def evaluate(self, folder, metric_names, plot=True):
        return evaluate_representation(self.model, self.data, self.config, folder, self.step,
                                       metric_names, plot)

    def measures(self):
        """The evaluation sample's measures (``sample_measures``) at the run's precision."""
        return sample_measures(self.model, self.data, self.config)

    def traversal(self):
        """The traversal image at the model's step, as the run draws it (uint8 pixels)."""
        return traversal_pixels(self.model, self.data, self.config, self.step)

    def ground_truth_summary(self):
        """The ground-truth plot's numbers of the whole grid (``grid_summary``), in memory."""
        codes = encode_all(self.model, self.data, self.config.precision)
        return grid_summary(codes, self.data, self.config.z_dim)


# --- the traversal figure ---------------------------------------------------------------------

TRAVERSAL_STREAM = 2  # the traversal's noise: its own generator, not the training RNG


def test_index(config, n_images):
    """The traversal's test images: image 0 and ``nb_test - 1`` drawn with the run's seed."""
    picker = torch.Generator().manual_seed(config.seed)
    return torch.cat([torch.zeros(1, dtype=torch.long),
                      torch.randint(n_images, (config.nb_test - 1,), generator=picker)])


def traversal_pixels(model, data, config, step, index=None):
    """The traversal image of ``model`` at ``step`` (``traversal_rows`` as a uint8 grid), what
    a run saves as <stem>_traversal_<step>.png. The reconstructions' noise comes from a
    generator seeded with (seed, step): the same image from the run and from its weights."""
    device = next(model.parameters()).device
    index = test_index(config, len(data)) if index is None else index
    x = data.images(index.to(device))  # T, ch, 64, 64
    generator = torch.Generator(device).manual_seed(
        derived_seed(config.seed, TRAVERSAL_STREAM, step))
    rows = traversal_rows(model, x, lambda mu: torch.randn(mu.shape, generator=generator,
                                                          device=mu.device))
    return image_grid(rows.cpu())


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


# --- the encoding pass and the evaluation ------------------------------------------------------

def encode_all(model, data, precision, should_stop=None, batch_size=None):
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


# --- any encoder: the same data, protocols and seeds as a run's evaluation ---------------------

SCORE_BATCH = 256  # images per call of an encoder; fp32 means do not depend on it, bf16's on AMX
#                    do, and a run's bf16 evaluation uses 256 on the CPU (``encode_all``)


class EncoderError(ConfigError):
    """An encoder given to ``score`` (or ``evaluate.py --encoder``) that cannot be scored; the
    message, one line, names the problem."""


def score(encode, dataset="dsprites", metrics=("factor_vae", "mig"), grid="full",
          data_dir=None, batch_size=SCORE_BATCH, scream_image=None):
    """Disentanglement scores of any encoder, with a run's data, protocols and seeds.

    ``encode`` takes a float32 tensor (N, C, 64, 64) in [0, 1] on the CPU (C: the dataset's
    channels) and returns its codes, (N, d), as a tensor or an array (a tuple's first element:
    an encoder returning (mean, log-variance)); score its mean representation. ``dataset`` and
    ``grid`` choose the data (the official npz in ``data_dir`` when there, else the procedural
    renderer; a variant's images are those every run is scored on; ``scream_image``: the
    painting of scream_dsprites), ``metrics`` the scores (names of ``metrics.METRIC_NAMES``, or "all"). Returns
    {metric: {"score": ..., "protocol": {...}, ...}}, as a run's metrics.json holds them.
    Raises EncoderError (bad codes, an exception inside ``encode``) or ConfigError."""
    names = _metric_names(metrics)
    return score_data(encode, _scored_data(dataset, data_dir, grid, scream_image), names,
                      batch_size)


def _metric_names(metrics):
    text = metrics if isinstance(metrics, str) else ",".join(metrics)
    try:
        return tuple(n for n in metric_list(text).split(",") if n)
    except argparse.ArgumentTypeError as err:
        raise ConfigError(str(err)) from None


def _scored_data(dataset, data_dir, grid, scream_image=None):
    if dataset not in FACTOR_DATASETS:
        raise ConfigError(f"dataset {dataset!r} has no ground-truth factors to score against; "
                          f"choose from {', '.join(FACTOR_DATASETS)}")
    try:
        return load_dataset(dataset, data_dir, grid, scream_image=scream_image)
    except DatasetError as err:
        raise ConfigError(str(err)) from None


def score_data(encode, data, names, batch_size=SCORE_BATCH):
    """``score`` on loaded data (``dataset.load_dataset``): {metric: result}."""
    codes = encode_with(encode, data, batch_size)
    return evaluate(lookup(codes, data.factor_sizes), data.factor_sizes, names)


def encode_with(encode, data, batch_size=SCORE_BATCH):
    """The codes (N, d) float32 that ``encode`` (see ``score``) gives every image of ``data``,
    in dataset order, ``batch_size`` images a call, checked batch by batch: EncoderError for
    an exception inside it (its last line quoted), a shape that is not one row per image, a
    code count that changes, or a code that is not finite."""
    codes = None
    for start in range(0, len(data), batch_size):
        index = torch.arange(start, min(start + batch_size, len(data)), device=data_device(data))
        x = data.images(index).float().cpu()
        try:
            with torch.no_grad():
                out = encode(x)
        except Exception as err:  # the encoder's own failure, whatever it is, is one line
            raise EncoderError(f"the encoder raised {last_line(err)}") from None
        array = _codes_array(out, len(x))
        if codes is None:
            codes = np.empty((len(data), array.shape[1]), dtype=np.float32)
        elif array.shape[1] != codes.shape[1]:
            raise EncoderError(f"the encoder returned {array.shape[1]} codes per image for "
                               f"images {start:,} on, {codes.shape[1]} before; give each "
                               f"image the same number")
        bad = np.argwhere(~np.isfinite(array))
        if len(bad):
            i, j = bad[0]
            raise EncoderError(f"the encoder returned a non-finite code ({array[i, j]}) for "
                               f"image {start + i:,}, dimension {j} ({len(bad)} in that batch "
                               f"of {len(x)}); codes must be finite")
        codes[start:start + len(x)] = array
    return codes


def _codes_array(out, n):
    if isinstance(out, (tuple, list)) and out and (torch.is_tensor(out[0])
                                                    or isinstance(out[0], np.ndarray)):
        out = out[0]  # (mean, log-variance)
    try:
        if not (torch.is_tensor(out) or isinstance(out, (np.ndarray, list, tuple))):
            raise TypeError
        array = (out.detach().float().cpu().numpy() if torch.is_tensor(out)
                 else np.asarray(out, dtype=np.float32))
    except (TypeError, ValueError, RuntimeError):
        raise EncoderError(f"the encoder returned a {type(out).__name__}, not codes: give a "
                           f"tensor or array of shape ({n}, d)") from None
    if array.ndim != 2 or array.shape[0] != n or array.shape[1] == 0:
        raise EncoderError(f"the encoder returned shape {tuple(array.shape)} for a batch of {n} "
                           f"images; expected ({n}, d), one row of d >= 1 codes per image")
    return array.astype(np.float32, copy=False)


def last_line(err):
    """'ValueError: bad input (encoder.py:12)': the exception's last line and the innermost
    frame it was raised in."""
    text = (str(err).strip().splitlines() or [""])[-1]
    frames = traceback.extract_tb(err.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}{': ' + text if text else ''}{where}"


def data_device(data):
    tensor = getattr(data, "packed", None)
    if tensor is None:
        tensor = getattr(data, "array", None)
    return tensor.device if torch.is_tensor(tensor) else torch.device("cpu")


# --- UDR: the mean codes of several runs on the same points ----------------------------------------

UDR_SEED = 1000  # with EVAL_SEED: the 1,000 images every run of every study is compared on


def udr_inputs(folders):
    """[(codes (P, K), mean KL per latent (K,))] of each run in ``folders`` (RunFolder: a
    checkpoint or final weights) on the same ``UDR_PROTOCOL["num_data_points"]`` images, drawn
    uniformly from their grid with a fixed seed, encoded on the CPU at each run's precision
    (fp32 where this CPU has no native bf16), and whether any run was encoded below its own
    precision (bf16 in fp32). The data is loaded once per dataset and grid. ConfigError for an
    unreadable run."""
    from metrics import UDR_PROTOCOL
    from precision import native_bf16

    loaded, out, lowered = {}, [], False
    for folder in folders:
        checkpoint, config = stored_model(folder)
        key = (config.dataset, config.grid, config.data_dir, config.scream_image)
        if key not in loaded:
            data = load_dataset(config.dataset, config.data_dir, config.grid,
                                config.celeba_crop, config.scream_image)
            rng = np.random.default_rng([EVAL_SEED, UDR_SEED])
            index = torch.from_numpy(rng.integers(0, len(data), UDR_PROTOCOL["num_data_points"]))
            loaded[key] = data.images(index)
        precision = config.precision if native_bf16("cpu") else "fp32"
        with torch.device("cpu"):
            model = build_model(dataclasses.replace(config, init="current"), "cpu")
        model.load_state_dict(checkpoint["model"])
        with evaluating(model), autocast("cpu", precision):
            mu, logvar = model.encoder(loaded[key])
        mu, logvar = mu.float(), logvar.float()
        out.append((mu.numpy().astype(np.float64),
                    kl_per_latent(mu, logvar).mean(0).numpy().astype(np.float64)))
        lowered |= precision != config.precision
    return out, lowered


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
    plot_path = folder.gt_plot_path(config, step)
    summary_path = folder.gt_summary_path(config, step)
    # A good plot is never redrawn over; a missing or unreadable one (a cut-short write) is.
    plot_ok, summary_ok = readable_png(plot_path), readable_npz(summary_path)
    plot = plot and not (plot_ok and summary_ok)
    if not plot and not metric_names:
        return {}  # nothing that needs the grid's codes
    codes = encode_all(model, data, config.precision, should_stop)
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
    try:
        results = score() if should_stop is None or not metric_names else run_abandonable(
            score, should_stop)
    except Exception as err:
        if not memory_failure(err) or isinstance(err, OutOfMemory):
            raise
        raise out_of_memory(f"the metrics ({', '.join(metric_names)}) at step {step:,}",
                            err) from None
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


SUMMARY_KEYS = ("variance", "pos", "by_scale", "by_rotation", "scales", "orientations")


def read_summary(path):
    """The arrays of the ground-truth summary at ``path`` (``grid_summary``, as saved);
    ValueError naming the cause where it cannot be read or lacks what the figures read."""
    try:
        with np.load(path) as arrays:
            summary = {k: arrays[k] for k in arrays.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise ValueError(f"{type(err).__name__}: {err}") from None
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise ValueError(f"KeyError: it lacks {', '.join(missing)}")
    return summary


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
