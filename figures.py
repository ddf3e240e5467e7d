"""Reproduce the thesis figures from run folders.

    python figures.py --nonsyn RUN --factor RUN --vae RUN [--compare RUN ...] [--celeba RUN]
                      [--out DIR] [--force] [--loss-steps 4000]
    python figures.py --study DIR [--celeba RUN] [--out DIR]   (a study.py folder: its first
                      finished seed of Non-Syn VAE, FactorVAE and VAE in the three roles,
                      --nonsyn etc. override; every other configuration's first finished seed
                      in comparison.md)
    python figures.py --curves RUN [RUN ...] [--band RUN ...] [--out DIR] [--curve-steps 1000]
    python figures.py --evidence STUDY_DIR [--at 50000] [--out DIR]   (the thesis's claims
                      counted over a study's seeds: claims.md, scores.md, seeds.png,
                      scores_over_training.png, and runs/ with every finished trial's
                      records and final weights; see evidence.py; --records-only: runs/
                      alone, which study.py --import-finished takes back on a new machine;
                      --carry DIR: the stopped, unfinished trials whole, with their
                      checkpoints, which study.py --import-unfinished DIR resumes there)

--out defaults to a new folder figures/<date-time>; an --out that already holds figures needs
--force (``--out misc --force`` regenerates the shipped ones). Nothing is written anywhere else.

The three roles are the thesis's (Non-Syn VAE, FactorVAE, plain VAE), but each takes a dSprites
run of any objective (e.g. --factor a beta-TCVAE run: latents.png then sets Non-Syn VAE beside it).

writes into --out:
  traversals.gif       the Non-Syn run's traversal images in step order, step drawn on each frame
  latents.png          Non-Syn VAE vs FactorVAE: final traversals with each latent labelled by the
                       ground-truth factor it tracks most, beside their ground-truth plots
  VAE_traversals.png   the same for the plain VAE
  traversal_labelled.png  the Non-Syn run's final traversal, its rows named (original,
                       reconstruction, z0: the factor it tracks, ...)
  plots.png            reconstruction, KL and synergy loss of the Non-Syn run (first --loss-steps)
  faces_celeba.png     the CelebA run's final traversal (only with --celeba)
  comparison.md/.json  final losses and disentanglement scores per run (the three, --compare's
                       and --study's others), and what each latent learned (the factor and its
                       share of the latent's variance)
  runs/<run>/          the three runs' (and CelebA's) config.json, metrics.jsonl and metrics.json
                       (small text, without machine paths) and the final weights alone, model.pt
                       (evaluate.py scores them)

or, with --curves (Non-Syn runs logged every step, e.g. --arch 2018 over several seeds):
  curves_thesis.png    recon, KL and synergy sampled every 20 steps from a (0, 0) point, as the
                       original's visdom plot, mean and min-max band over the runs, beside the
                       thesis curve's anchors
  curves_per_step.png  the same runs at every step (the short spikes the 20-step samples miss)
  curves.md            the 20-step samples at the anchors' steps against the anchors
  curves_vs_band.md    with --band: at each anchor, whether the runs' mean lies within the
                       --band runs' min-max (e.g. bf16 runs against the fp32 seeds)

Everything comes from what the runs saved (traversal PNGs, metrics.jsonl, metrics.json, the
ground-truth summaries); a run without a ground-truth summary is re-encoded from its checkpoint.
"""
import argparse
import errno
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from plotting import (ACTIVE_VARIANCE, EXPLAINED, label_rows, latent_factors, latent_labels,
                      traversal_labels)
from metrics import METRIC_LABELS, METRIC_NAMES
from config import NONSYN, OBJECTIVE_NAMES, RESUMABLE, Config, objective_label
from evidence import EvidenceError, finished_runs, study_trials, write_evidence
from representation import SAMPLE_MEASURES, Trained, read_summary
from dataset import FACTOR_DATASETS
from precision import PRECISIONS
from runfolder import RunFolder, export_weights, stored_run
from utils import ArgumentParser, ConfigError


log = logging.getLogger("figures")


class FigureError(RuntimeError):
    """A run folder lacks what a figure needs; the message names the folder and the file."""


def check_out_outside(out, folders):
    """Refuse an --out that holds (or is) a source run folder: the figures and the exported
    records (OUT/runs/<name>/) would rewrite that run's own files."""
    where = Path(out).resolve()
    for folder in folders:
        source = folder.path.resolve()
        if source == where or where in source.parents:
            raise FigureError(f"--out {out} holds the run folder {folder}: the figures and "
                              f"the exported records would rewrite its own files; choose an "
                              f"--out outside the runs")


def run_titles(folders):
    """[(name, folder)]: each run's name in comparison.md, its objective's name (Non-Syn VAE,
    FactorVAE, ...), or, where two runs share it, the objective with its settings and seed."""
    configs = [folder.read_config()["config"] for folder in folders]
    names = [OBJECTIVE_NAMES[config["metric"]] for config in configs]
    return [(name if names.count(name) == 1 else
             f"{objective_label(config)}, seed {config['seed']}", folder)
            for name, config, folder in zip(names, configs, folders, strict=True)]


def check_kind(folder, flag, metrics=None, dataset=None):
    """Refuse a run folder of the wrong kind for ``flag`` before anything is written."""
    if not folder.path.is_dir():
        raise FigureError(f"{flag} {folder} is not a run folder")
    try:
        config = folder.read_config().get("config")
    except ConfigError as err:
        raise FigureError(f"{flag} {folder}: {err}") from None
    if config is None:
        raise FigureError(f"{flag} {folder} has no {folder.CONFIG}: not a run folder of this "
                          f"project")
    try:  # every setting known and in bounds (an edited file could name no objective)
        Config.from_stored(folder.started_settings(), f"{folder}/{folder.CONFIG}")
    except ConfigError as err:
        raise FigureError(f"{flag} {err}; the file was damaged or edited, or written by "
                          f"another version of this code") from None
    if metrics is not None and config.get("metric") not in metrics:
        raise FigureError(f"{flag} {folder} is a --metric {config.get('metric')} run; {flag} "
                          f"takes a --metric {' / '.join(metrics)} run")
    datasets = (dataset,) if isinstance(dataset, str) else dataset
    if datasets is not None and config.get("dataset") not in datasets:
        raise FigureError(f"{flag} {folder} was trained on {config.get('dataset')}; {flag} "
                          f"takes a {' / '.join(datasets)} run")


ROLES = (("nonsyn", NONSYN), ("factor", ("Factor",)), ("vae", ("VAE",)))  # flag, its default


def study_runs(study_dir, given=()):
    """({flag: run folder}, [run folder, ...]) of a study.py folder: for each role flag not in
    ``given``, the first finished trial (first configuration, first seed) of its default
    objective (Non-Syn VAE, FactorVAE, VAE); and the first finished seed of every
    configuration, in the study's order."""
    path = Path(study_dir) / "study.json"
    if not path.is_file():
        raise FigureError(f"--study {study_dir} has no study.json: not a study.py folder")
    trials = json.loads(path.read_text())["trials"]
    picks = {}
    for flag, metrics in ROLES:
        if flag in given:
            continue
        kind = [t for t in trials if t["metric"] in metrics]
        done = [t for t in kind if t["state"] == "finished"]
        if not done:
            raise FigureError(f"--study {study_dir} has no finished --metric {' / '.join(metrics)} "
                              f"trial ({len(kind)} in the study); finish it or give --{flag} RUN "
                              f"(a run of any objective)")
        picks[flag] = str(Path(study_dir) / done[0]["name"])
    others, seen = [], set()
    for trial in trials:  # a configuration is a trial name without its seed
        configuration = trial["name"].rpartition("_seed")[0]
        if trial["state"] != "finished" or configuration in seen:
            continue
        seen.add(configuration)
        others.append(str(Path(study_dir) / trial["name"]))
    return picks, others


def traversal_images(folder):
    images = folder.traversals()
    if not images:
        raise FigureError(f"{folder} has no traversal images (<stem>_traversal_<step>.png)")
    return images


def training_records(folder):
    if not (folder.path / folder.LOG).exists():
        raise FigureError(f"{folder} has no {folder.LOG}")
    return folder.records("train"), folder.records("eval")


def ground_truth_summary(folder):
    """(step, arrays) of the run's latest ground-truth summary; a folder that has none but
    holds the model (final weights, as misc/runs/<run>, or a checkpoint) gets it computed from
    the model in memory: nothing is written into a source run folder."""
    summaries = folder.gt_summaries()
    if not summaries:
        key = folder.path.resolve()
        if key not in _SUMMARIES:  # one encoding pass of the grid per run and command
            trained = _from_weights(folder)
            if trained is None:
                raise FigureError(f"{folder} has no ground-truth summary (<stem>_gt_<step>.npz) "
                                  f"and no model weights to compute one from")
            _SUMMARIES[key] = trained.step, trained.ground_truth_summary()
        return _SUMMARIES[key]
    step, path = summaries[-1]
    try:
        summary = read_summary(path)
    except ValueError as err:
        raise FigureError(f"{path} cannot be read ({err}); it was cut "
                          f"short or damaged: 'python evaluate.py {folder} --eval-metrics none' "
                          f"redraws the summary of the checkpoint's step") from None
    return step, summary


def has_model(folder):
    return folder.checkpoint_path.is_file() or folder.weights_path.is_file()


_TRAINED = {}  # folder path -> Trained
_DATASETS = {}  # Trained.build's: the data is built once per dataset and command
_SUMMARIES = {}  # folder path -> (step, summary) computed from its weights
DRAW_PRECISION = [None]  # --precision: None draws each run at its own


def _from_weights(folder):
    """The run's model at its checkpoint or final weights (Trained), or None without them."""
    if not has_model(folder):
        return None
    key = folder.path.resolve()
    if key not in _TRAINED:
        try:
            trained = Trained.load(folder, "figures.py", _DATASETS, cuda=False,
                                   precision=DRAW_PRECISION[0])
        except ConfigError as err:
            raise FigureError(f"{folder}: {err}") from None
        precision, own = trained.config.precision, trained.run_precision
        log.info("%s: drawing from its model weights (step %d, %s%s): it has no saved images",
                 folder, trained.step, precision,
                 "" if precision == own else f", not the run's {own}")
        _TRAINED[key] = trained
    return _TRAINED[key]


def final_traversal(folder, step=None):
    """(step, pixels) of the run's traversal at ``step`` (default: its latest): grayscale for
    dSprites, RGB for a colour dataset (its variants, CelebA); a folder without traversal
    images but with the model gets the traversal drawn from it, as the run draws it (the same
    test images and noise)."""
    dataset = folder.read_config().get("config", {}).get("dataset", "dsprites")
    mode = "L" if dataset == "dsprites" else "RGB"
    images = folder.traversals()
    if not images:
        trained = _from_weights(folder)
        if trained is None:
            traversal_images(folder)  # the error naming what is missing
        pixels = trained.traversal()
        return trained.step, np.asarray(Image.fromarray(pixels).convert(mode))
    traversals = dict(images)
    image_step = step if step in traversals else max(traversals)
    return image_step, np.asarray(read_image(traversals[image_step], mode))


def read_image(path, mode):
    """The image at ``path`` in ``mode`` ("RGB", "L"); FigureError (one line) when it cannot be
    read."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise FigureError(f"{path} cannot be read as an image ({type(err).__name__}); it was "
                          f"cut short or damaged: move it out of the run folder and the figures "
                          f"use the run's other traversals") from None


GIF_HEADER = 26  # pixels above each frame for its caption


def write_gif(folder, path, frame_ms=250):
    """The run's traversal images in step order as a looping GIF, each frame captioned with the
    objective, seed and step."""
    from PIL import ImageFont
    config = folder.read_config()["config"]
    frames = []
    for step, image_path in traversal_images(folder):
        image = read_image(image_path, "RGB")
        frame = Image.new("RGB", (image.width, image.height + GIF_HEADER), "white")
        frame.paste(image, (0, GIF_HEADER))
        draw = ImageDraw.Draw(frame)
        caption = f"step {step:,}   {objective_label(config)}, seed {config['seed']}"
        size = 15
        while size > 8 and draw.textlength(caption, ImageFont.load_default(size)) > \
                image.width - 8:
            size -= 1
        draw.text((4, GIF_HEADER // 2), caption, fill="black",
                  font=ImageFont.load_default(size), anchor="lm")
        frames.append(frame.convert("P", palette=Image.ADAPTIVE))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return len(frames)


def labelled_traversal(folder, path):
    """The run's final traversal PNG with its rows named (``plotting.label_rows``)."""
    step, summary = ground_truth_summary(folder)
    image_step, pixels = final_traversal(folder, step)
    labels = traversal_labels(len(summary["variance"]), latent_labels(summary))
    Image.fromarray(label_rows(pixels, labels)).save(path)
    return image_step


FACTOR_COLOURS = {"position x": "tab:blue", "position y": "tab:orange", "scale": "tab:green",
                  "rotation": "tab:red", "shape": "tab:purple"}
SHAPES = ("square", "ellipse", "heart")
PANEL_HEIGHT = 4.6  # inches: the traversal grid's height, and the mean-activation panel's


def final_state(folder):
    """(step of its images, traversal pixels, ground-truth summary, step of the summary) of a
    run's latest evaluation (the traversal saved at that step, else its latest)."""
    step, summary = ground_truth_summary(folder)
    image_step, pixels = final_traversal(folder, step)
    return image_step, pixels, summary, step


def _fit_width(fig, text, inches, smallest=7):
    """Shrinks ``text``'s font until it is at most ``inches`` wide (a long objective label must
    not run into the next model's title or off the figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    while text.get_fontsize() > smallest and \
            text.get_window_extent(renderer).width / fig.dpi > inches:
        text.set_fontsize(text.get_fontsize() - 0.5)


def _model_block(fig, left, bottom, folder, sizes):
    """One model of latents.png at (left, bottom) inches: the traversal grid, the rows of the
    latents that track a factor boxed and labelled in the factor's colour, and beside it the
    mean activations of the active latents only (position heatmap, mean against scale and
    against rotation per shape), at the grid's height, shared axes, no ticks."""
    from matplotlib.patches import Rectangle

    width, height = fig.get_size_inches()
    inches = lambda x, y, w, h: [x / width, y / height, w / width, h / height]  # noqa: E731
    image_step, pixels, summary, step = final_state(folder)
    factors = latent_factors(summary)
    rows = 2 + len(factors)
    pad = 2
    cell = (pixels.shape[0] - pad) / rows
    label_w, grid_w, gap, panel_w = sizes
    ax = fig.add_axes(inches(left + label_w, bottom, grid_w, PANEL_HEIGHT))
    ax.imshow(pixels, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    names = ["original", "reconstruction"] + [f"z{j}" for j in range(len(factors))]
    for r, label in enumerate(names):
        factor = factors[r - 2][0] if r >= 2 else None
        colour = FACTOR_COLOURS.get(factor, "black" if r < 2 else "0.55")
        text = f"{label}  {factor}" if factor in FACTOR_COLOURS or factor == "none" else label
        ax.text(-8, pad / 2 + (r + 0.5) * cell, text, ha="right", va="center", color=colour,
                fontsize=10, fontweight="bold" if factor in FACTOR_COLOURS else "normal")
        if factor in FACTOR_COLOURS:
            ax.add_patch(Rectangle((0.5, pad / 2 + r * cell + 0.5), pixels.shape[1] - 2,
                                   cell - 1, fill=False, edgecolor=colour, linewidth=2.2))
    config = folder.read_config()["config"]
    title = fig.text(left / width, (bottom + PANEL_HEIGHT + 0.3) / height,
                     f"{objective_label(config)}, seed {config['seed']}\nstep {image_step:,}"
                     + (f"; labels and mean activations: step {step:,}"
                        if step != image_step else ""), fontsize=11, va="bottom")
    _fit_width(fig, title, sum(sizes))

    active = [j for j, (factor, _) in enumerate(factors) if factor != "inactive"]
    x0 = left + label_w + grid_w + gap
    if not active:
        fig.text((x0 + panel_w / 2) / width, (bottom + PANEL_HEIGHT / 2) / height,
                 "no active latent", ha="center", va="center")
        return
    n = len(active)
    size = min(PANEL_HEIGHT / n, panel_w / 3)  # square panels, at most the grid's height
    top = bottom + (PANEL_HEIGHT + n * size) / 2
    pos, by_scale, by_rotation = (summary[k][..., active] for k in ("pos", "by_scale",
                                                                      "by_rotation"))
    limits = [(a.min() - 0.08 * np.ptp(a) - 1e-3, a.max() + 0.08 * np.ptp(a) + 1e-3)
              for a in (by_scale, by_rotation)]
    inner = 0.06 * size
    for i, j in enumerate(active):
        y = top - (i + 1) * size + inner / 2
        panels = [fig.add_axes(inches(x0 + c * size + inner / 2, y, size - inner,
                                      size - inner)) for c in range(3)]
        panels[0].imshow(pos[:, :, i], cmap="coolwarm", vmin=pos.min(), vmax=pos.max(),
                         interpolation="nearest", aspect="auto")
        for k, shape in enumerate(SHAPES):
            panels[1].plot(summary["scales"], by_scale[k, :, i], linewidth=1.4, label=shape)
            panels[2].plot(summary["orientations"], by_rotation[k, :, i], linewidth=1.4,
                           label=shape)
        panels[1].set_ylim(*limits[0])
        panels[2].set_ylim(*limits[1])
        for panel in panels:
            panel.set_xticks([])
            panel.set_yticks([])
        factor = factors[j][0]
        panels[0].set_ylabel(f"z{j}", fontsize=10, color=FACTOR_COLOURS.get(factor, "0.3"),
                             fontweight="bold" if factor in FACTOR_COLOURS else "normal")
        if i == 0:
            for panel, title in zip(panels, ("pos", "scale", "rotation"), strict=True):
                panel.set_title(title, fontsize=10 if size > 0.75 else 8)
    handles, labels = panels[2].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=3, frameon=False, fontsize=7,
               handlelength=1.2, columnspacing=0.8,
               bbox_to_anchor=((x0 + 1.5 * size) / width, (top - n * size) / height))


def comparison_figure(runs, path):
    """The original's latents figure: per run, its final traversal with the rows of latents
    that track a factor boxed and labelled (the automatic labels), then the mean-activation
    panel of its active latents, both at the same height."""
    from matplotlib.figure import Figure

    label_w, gap = 1.45, 0.25
    blocks = []
    for _, folder in runs:
        _, pixels, summary, _ = final_state(folder)
        grid_w = PANEL_HEIGHT * pixels.shape[1] / pixels.shape[0]
        active = sum(factor != "inactive" for factor, _ in latent_factors(summary))
        blocks.append((label_w, grid_w, gap, 3 * min(PANEL_HEIGHT / max(active, 1),
                                                     0.21 * PANEL_HEIGHT)))
    spacing, margin = 0.35, 0.2
    width = sum(sum(b) for b in blocks) + spacing * (len(blocks) - 1) + 2 * margin
    height = PANEL_HEIGHT + 1.05  # room for a two-line title
    fig = Figure(figsize=(width, height))
    left = margin
    for (_, folder), sizes in zip(runs, blocks, strict=True):
        _model_block(fig, left, 0.35, folder, sizes)
        left += sum(sizes) + spacing
    fig.savefig(path, dpi=130, facecolor="white")


def loss_plot(folder, path, max_step=4000):
    from matplotlib.figure import Figure

    rows = [r for r in training_records(folder)[0] if r["step"] <= max_step]
    if not rows:
        raise FigureError(f"{folder}/{folder.LOG} has no training record up to step {max_step}")
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    config = folder.read_config()["config"]
    steps = [r["step"] for r in rows]
    every = steps[1] - steps[0] if len(steps) > 1 else steps[0]
    fig.suptitle(f"{objective_label(config)}, seed {config['seed']}: the first {steps[-1]:,} "
                 f"steps, a point every {every} steps (the training batch's values)",
                 fontsize="medium")
    for ax, key, title in zip(fig.subplots(1, 3), ("recon", "kl", "syn"),
                              ("reconstruction loss", "KL divergence", "synergy loss"), strict=True):
        ax.plot(steps, [r[key] for r in rows])
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    return len(rows)


# Anchors read off the original README's plot (alpha 5, omega 0.9, the 2018 decoder): (step,
# value) pairs, and ranges "later" where the plot gives a level rather than a point.
THESIS_ANCHORS = {
    "recon": [(20, 2860), (260, 600), (340, 250)],
    "kl": [(40, 128), (320, 21)],
    "syn": [(20, 0.0), (40, 31), (60, 1.2), (300, 13), (500, 2.3), (660, 1.0)],
}
THESIS_LATER = {"kl": (15, 17)}
SAMPLE_EVERY = 20  # the original gathered visdom points every 20 steps


def sampled_curves(folders, max_step):
    """{term: (steps, values (runs, points))} at every SAMPLE_EVERY-th step from a (0, 0) point,
    and the per-step {term: (steps, values)}; every run must have a record at every step."""
    per_step = {}
    for term in ("recon", "kl", "syn"):
        rows = []
        for folder in folders:
            by_step = {r["step"]: r[term] for r in training_records(folder)[0]}
            missing = [s for s in range(1, max_step + 1) if s not in by_step]
            if missing:
                raise FigureError(f"{folder}/{folder.LOG} has no record at step {missing[0]}: "
                                  f"--curves needs runs logged every step (--log-interval 1) "
                                  f"for at least {max_step} steps")
            rows.append([by_step[s] for s in range(1, max_step + 1)])
        per_step[term] = (np.arange(1, max_step + 1), np.array(rows))
    steps = np.arange(0, max_step + 1, SAMPLE_EVERY)
    sampled = {term: (steps, np.concatenate([np.zeros((len(folders), 1)),
                                             values[:, SAMPLE_EVERY - 1::SAMPLE_EVERY]], axis=1))
               for term, (_, values) in per_step.items()}
    return sampled, per_step


def curve_figures(folders, out_dir, max_step=1000):
    """curves_thesis.png, curves_per_step.png and curves.md (see the module docstring)."""
    from matplotlib.figure import Figure

    sampled, per_step = sampled_curves(folders, max_step)
    titles = dict(recon="reconstruction loss", kl="KL divergence", syn="synergy loss")
    n = len(folders)
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    for ax, term in zip(fig.subplots(1, 3), titles, strict=True):
        steps, values = sampled[term]
        ax.fill_between(steps, values.min(0), values.max(0), alpha=0.25,
                        label=f"min-max over {n} runs")
        ax.plot(steps, values.mean(0), marker=".", label=f"mean, every {SAMPLE_EVERY} steps")
        anchor_steps, anchor_values = zip(*THESIS_ANCHORS[term], strict=True)
        ax.plot(anchor_steps, anchor_values, "kx", markersize=8, label="thesis plot anchors")
        if term in THESIS_LATER:
            ax.axhspan(*THESIS_LATER[term], color="k", alpha=0.1, label="thesis, later")
        ax.set_title(titles[term])
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.axes[2].legend(fontsize="small")
    fig.savefig(out_dir / "curves_thesis.png", dpi=110)

    fig = Figure(figsize=(13, 3.6), layout="constrained")
    for ax, term in zip(fig.subplots(1, 3), titles, strict=True):
        steps, values = per_step[term]
        for folder, row in zip(folders, values, strict=True):
            ax.plot(steps, row, linewidth=0.8, label=folder.name)
        ax.set_title(f"{titles[term]}, per step")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.axes[2].legend(fontsize="small")
    fig.savefig(out_dir / "curves_per_step.png", dpi=110)

    lines = [f"20-step samples of {n} runs ({', '.join(f.name for f in folders)}) at the thesis "
             f"plot's anchors: mean [min, max].", "",
             "| term | step | thesis | this project |", "| --- | --- | --- | --- |"]
    for term in titles:
        steps, values = sampled[term]
        for step, anchor in THESIS_ANCHORS[term]:
            if step <= max_step:
                column = values[:, step // SAMPLE_EVERY]
                lines.append(f"| {term} | {step} | {anchor:g} | {column.mean():.4g} "
                             f"[{column.min():.4g}, {column.max():.4g}] |")
    (out_dir / "curves.md").write_text("\n".join(lines) + "\n")
    return len(sampled["syn"][0])


def band_table(folders, band_folders, out_dir, max_step=1000):
    """curves_vs_band.md: at each thesis anchor, whether the mean of ``folders``' 20-step
    samples lies within the min-max band of ``band_folders``' (e.g. bf16 runs against the
    fp32 seeds). Returns (anchors inside, anchors)."""
    sampled, _ = sampled_curves(folders, max_step)
    band, _ = sampled_curves(band_folders, max_step)
    lines = [f"20-step samples at the thesis plot's anchors: the mean of {len(folders)} runs "
             f"({', '.join(f.name for f in folders)}) against the min-max band of "
             f"{len(band_folders)} runs ({', '.join(f.name for f in band_folders)}).", "",
             "| term | step | thesis | band [min, max] | mean | inside |",
             "| --- | --- | --- | --- | --- | --- |"]
    inside = total = 0
    for term in ("recon", "kl", "syn"):
        for step, anchor in THESIS_ANCHORS[term]:
            if step > max_step:
                continue
            column = band[term][1][:, step // SAMPLE_EVERY]
            low, high = column.min(), column.max()
            mean = sampled[term][1][:, step // SAMPLE_EVERY].mean()
            ok = bool(low <= mean <= high)
            inside, total = inside + ok, total + 1
            lines.append(f"| {term} | {step} | {anchor:g} | [{low:.4g}, {high:.4g}] | "
                         f"{mean:.4g} | {'yes' if ok else 'no'} |")
    lines += ["", f"{inside} of {total} anchors inside the band."]
    (out_dir / "curves_vs_band.md").write_text("\n".join(lines) + "\n")
    return inside, total


def faces_figure(folder, path):
    step, image_path = traversal_images(folder)[-1]
    Image.open(image_path).save(path)
    return step


def learned_table(runs):
    """What each latent learned, per dSprites run: the factor whose conditional means explain
    most of the latent's variance over the data, and that share (plotting.latent_factors), from
    the run's latest ground-truth summary."""
    runs = [(name, folder) for name, folder in runs
            if folder.read_config()["config"].get("dataset", "dsprites") in FACTOR_DATASETS]
    columns = []
    for _, folder in runs:
        step, summary = ground_truth_summary(folder)
        columns.append((step, latent_factors(summary)))
    z_dim = max(len(factors) for _, factors in columns)
    lines = ["What each latent learned: the factor that explains most of its variance over the "
             "data (share of the variance in brackets; inactive: variance of its mean < "
             f"{ACTIVE_VARIANCE:g}; none: no factor explains {EXPLAINED:.0%}; rotation is measured "
             "within each shape, as the shapes' symmetries make their rotation curves differ), "
             "at each run's last ground-truth evaluation.", "",
             "| latent | " + " | ".join(f"{name} (step {step:,})"
                                        for (name, _), (step, _) in zip(runs, columns,
                                                                       strict=True)) + " |",
             "|" + " --- |" * (1 + len(runs))]
    for j in range(z_dim):
        cells = []
        for _, factors in columns:
            factor, share = factors[j] if j < len(factors) else ("", 0.0)
            cells.append("inactive" if factor == "inactive" else f"{factor} ({share:.2f})")
        lines.append(f"| z{j} | " + " | ".join(cells) + " |")
    return lines


# an absolute path inside a record's strings (the output folder, where the data was looked for)
MACHINE_PATH = re.compile(r"(?<![\w.~/:\\])/[\w.\-]+(?:/[\w.\-]+)*")


def without_machine_paths(text):
    """A record's text with every absolute path replaced by ``<path>``: the copies kept in a
    repository name no folder of the machine that trained the run."""
    return MACHINE_PATH.sub("<path>", text)


def export_records(runs, out_dir, at=()):
    """OUT/runs/<run folder name>/: each run's config.json, metrics.jsonl and metrics.json (their
    absolute paths replaced by ``<path>``; config.json's data_dir unset: evaluate.py looks for
    the data where the copy is scored, as run.py does without --data-dir), so that every figure
    and number can be traced to the run that made it, and its final model weights alone
    (model.pt, ~2 MB: ``python evaluate.py OUT/runs/<run>`` scores them), and its ground-truth
    summary (<stem>_gt_<step>.npz) at its last step and at the steps ``at``, from which the
    claims are decided (the scores over training are in metrics.jsonl): such a copy of a
    finished run counts as finished (``RunFolder.holds_finished_export``) where
    ``study.py --import-finished`` takes it into a study on another machine. metrics.jsonl is
    copied a record at a time: a line that is not a record (``RunFolder.record_lines``) is
    left out, as the figures leave it out."""
    for _, folder in runs:
        target = Path(out_dir) / "runs" / folder.name
        target.mkdir(parents=True, exist_ok=True)
        record = folder.read_config()  # the data is searched for where the copy is used
        record["config"]["data_dir"] = None
        (target / folder.CONFIG).write_text(
            without_machine_paths(json.dumps(record, indent=2, sort_keys=True) + "\n"))
        with open(target / folder.LOG, "w") as log_copy:
            for _, line in folder.record_lines():
                log_copy.write(without_machine_paths(line))
        if (folder.path / folder.REPORT).is_file():
            evaluations = folder.evaluations()  # checked: a JSON object with its list
            text = json.dumps(dict(evaluations=evaluations), indent=2, sort_keys=True) + "\n"
            (target / folder.REPORT).write_text(without_machine_paths(text))
        if folder.checkpoint_path.is_file():
            export_weights(folder, target)
        elif folder.weights_path.is_file():  # already bound to its run (export_weights)
            shutil.copyfile(folder.weights_path, target / folder.WEIGHTS)
        summaries = folder.gt_summaries()  # ~50 kB each: the final one, and those at ``at``
        for step, summary in summaries:
            if step in at or step == summaries[-1][0]:
                shutil.copyfile(summary, target / summary.name)
    return len(runs)


def _same_run(one, other):
    """True when two config.json records hold the same run (the settings a resume may not
    change, their paths rewritten as the banked copies have them)."""
    settings = [{k: without_machine_paths(v) if isinstance(v, str) else v
                 for k, v in record.get("config", {}).items() if k not in RESUMABLE}
                for record in (one, other)]
    return settings[0] == settings[1]


def plan_carry(study, carry):
    """(to bank, to drop) for ``--carry``: the study's stopped, unfinished trials that have a
    checkpoint (each validated, and newer than its copy in ``carry`` if there is one), and the
    copies in ``carry`` of trials that have finished since (their records and weights go to
    runs/). Nothing is written; FigureError (one line) for a trial that trains now, or whose
    copy in ``carry`` is another run or a later step than the study's."""
    bank, drop = [], []
    for trial in study_trials(study):
        folder = RunFolder(Path(study) / trial["name"])
        banked = RunFolder(Path(carry) / trial["name"])
        if not folder.path.is_dir():
            continue
        if banked.path.exists() and not _same_run(banked.read_config(), folder.read_config()):
            raise FigureError(f"--carry {carry}: {banked} holds another run than the study's "
                              f"trial {trial['name']}; nothing was written. Move it away")
        if trial.get("state") == "finished":
            if banked.path.exists():
                drop.append(banked)
            continue
        if not folder.checkpoint_path.is_file():
            continue  # stopped before its first checkpoint: nothing to resume from
        if holder := folder.lock_holder():
            raise FigureError(f"trial {trial['name']} is training now (PID {holder}); stop the "
                              f"study first (kill -TERM its study.py: each running trial saves a "
                              f"checkpoint), then bank it. Nothing was written")
        step = stored_run(folder)[0]["step"]  # a damaged checkpoint is named, not banked
        try:
            before = banked.load_checkpoint()["step"] if banked.path.exists() else None
        except ConfigError:
            before = -1  # an unreadable copy is worth nothing: replaced (and said so)
        if before is not None and before > step:
            raise FigureError(f"--carry {carry}: {banked} holds trial {trial['name']} at step "
                              f"{before:,}, later than the study's {step:,} (this study did not "
                              f"resume from it: study.py --import-unfinished {carry} takes it "
                              f"into a new study folder); nothing was written")
        if before != step:
            bank.append((folder, banked, step, before))
    return bank, drop


def write_carry(carry, bank, drop):
    """Bank each planned trial (``plan_carry``) whole in ``carry``/<trial>/ (written beside, then
    renamed into place, replacing its older copy) and remove the copies of finished trials."""
    carry = Path(carry)
    carry.mkdir(parents=True, exist_ok=True)
    said = []
    for folder, banked, step, before in bank:
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.carry-", suffix=".tmp", dir=carry))
        try:
            folder.copy_resumable(work / "run", without_machine_paths)
            if banked.path.exists():
                os.rename(banked.path, work / "older")
            os.rename(work / "run", banked.path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        said.append(f"{folder.name} at step {step:,}" + (
            "" if before is None else " (its unreadable copy replaced)" if before < 0 else
            f" (replacing its copy at {before:,})"))
    for banked in drop:
        shutil.rmtree(banked.path)
    return (f"{carry}/: {len(bank)} unfinished trial(s) banked to resume elsewhere"
            + (f" ({'; '.join(said)})" if said else "")
            + (f"; removed the copies of {len(drop)} trial(s) finished since "
               f"({', '.join(b.name for b in drop)})" if drop else ""))


def comparison_table(runs, out_dir):
    """Per run its final evaluation: recon, KL, ELBO and I_max over the fixed evaluation sample
    (the same measure for every objective; blank for a run evaluated before they existed) and
    the disentanglement scores, as comparison.md and comparison.json."""
    table = []
    for name, folder in runs:
        train, evaluations = training_records(folder)
        if not train:
            raise FigureError(f"{folder}/{folder.LOG} has no training record")
        config = folder.read_config()["config"]
        measures = folder.last_evaluated("measures")
        table.append(dict(run=name, folder=folder.name, metric=config["metric"],
                          objective=objective_label(config), step=train[-1]["step"],
                          measures={k: measures[k] for k in SAMPLE_MEASURES if k in measures},
                          measure_omega=measures.get("measure_omega"),
                          scores=evaluations[-1]["scores"] if evaluations else {}))
    names = [n for n in METRIC_NAMES if any(n in row["scores"] for row in table)]
    omegas = sorted({row["measure_omega"] for row in table if row["measure_omega"]})
    i_max = f"I_max (omega {', '.join(f'{w:g}' for w in omegas or [Config.measure_omega])})"
    lines = ["| run | objective | step | recon | KL | ELBO | " + i_max + " | "
             + " | ".join(METRIC_LABELS[n] for n in names) + " |",
             "|" + " --- |" * (7 + len(names))]
    for row in table:
        m = row["measures"]
        cells = [f"{m['recon']:.1f}", f"{m['kl']:.2f}", f"{m['elbo']:.1f}",
                 f"{m['i_max']:.3f}"] if m else [""] * 4
        scores = [f"{row['scores'][n]:.3f}" if n in row["scores"] else "" for n in names]
        lines.append(f"| {row['run']} | {row['objective']} | {row['step']:,} | "
                     + " | ".join(cells + scores) + " |")
    lines.append("\nrecon, KL, ELBO, I_max: the final evaluation's fixed sample of images "
                 "(docs/studies.md); I_max alpha-free at one omega for every objective.")
    lines += [""] + learned_table(runs)
    (Path(out_dir) / "comparison.md").write_text("\n".join(lines) + "\n")
    (Path(out_dir) / "comparison.json").write_text(json.dumps(table, indent=2) + "\n")
    return table


FIGURE_NAMES = (  # what figures.py writes, in any of its modes: an --out holding one needs --force
    "traversals.gif", "latents.png", "VAE_traversals.png", "traversal_labelled.png", "plots.png",
    "faces_celeba.png", "comparison.md", "comparison.json", "runs", "curves_thesis.png",
    "curves_per_step.png", "curves.md", "curves_vs_band.md", "claims.md", "claims.json",
    "scores.md", "scores.json", "seeds.png", "scores_over_training.png", "wallclock.md",
    "wallclock.json")


def main(argv=None):
    p = ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nonsyn", help="the run of traversals.gif, plots.png and latents.png's "
                                    "left half: the thesis's Non-Syn VAE (--metric Test_gt), "
                                    "or any objective's dSprites run")
    p.add_argument("--factor", help="the run of latents.png's right half: the thesis's FactorVAE "
                                    "(--metric Factor), or any objective's")
    p.add_argument("--vae", help="the run of VAE_traversals.png: the thesis's plain VAE "
                                 "(--metric VAE), or any objective's")
    p.add_argument("--compare", nargs="+", metavar="RUN", default=[],
                   help="more runs (any objective) listed in comparison.md beside those three")
    p.add_argument("--study", help="a study.py folder: its first finished Non-Syn / FactorVAE / "
                                   "VAE trials in the three roles (unless given), and the first "
                                   "finished seed of every other configuration in comparison.md")
    p.add_argument("--celeba", help="CelebA run folder, for faces_celeba.png")
    p.add_argument("--curves", nargs="+", metavar="RUN",
                   help="instead: compare these Non-Syn runs (logged every step) with the "
                        "thesis curve")
    p.add_argument("--band", nargs="+", metavar="RUN",
                   help="with --curves: also check the --curves runs' mean against these runs' "
                        "min-max band at the anchors (curves_vs_band.md)")
    p.add_argument("--evidence", metavar="STUDY_DIR",
                   help="instead: the thesis's claims counted over the seeds of a study of its "
                        "three models (study.py --preset evidence): claims.md, scores.md, "
                        "seeds.png, scores_over_training.png (evidence.py), and runs/ with "
                        "every finished trial's records and final weights")
    p.add_argument("--records-only", action="store_true",
                   help="with --evidence: only runs/, the finished trials' records, ground-truth "
                        "summaries and final weights (what study.py --import-finished takes "
                        "into the study on another machine), no tables or figures")
    p.add_argument("--carry", metavar="CARRY_DIR",
                   help="with --evidence: also bank each stopped, unfinished trial whole "
                        "(records, images, its checkpoints) in CARRY_DIR/<trial>/, which "
                        "study.py --import-unfinished CARRY_DIR resumes on another machine "
                        "from the same step; the copies of trials finished since are removed "
                        "(their records and weights are in runs/)")
    p.add_argument("--at", type=int, default=50_000,
                   help="with --evidence: the step every seed is judged at (default 50,000)")
    p.add_argument("--out", default=None,
                   help="folder for the figures (default: a new figures/<date-time>); one that "
                        "already holds figures needs --force")
    p.add_argument("--force", action="store_true",
                   help="write into an --out that already holds figures, replacing those of "
                        "the same name (e.g. --out misc to regenerate the shipped ones)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="draw a run that has no saved images from its weights at this "
                        "precision instead of its own (fp32 for a bf16 run on a machine "
                        "without native bf16)")
    p.add_argument("--loss-steps", type=int, default=4000, help="steps shown in plots.png")
    p.add_argument("--curve-steps", type=int, default=1000, help="steps shown with --curves")
    args = p.parse_args(argv)
    DRAW_PRECISION[0] = args.precision
    _TRAINED.clear()  # models, data and summaries are built once per command, not kept across calls
    _DATASETS.clear()
    _SUMMARIES.clear()
    if args.study and not (args.curves or args.evidence):
        try:
            picks, others = study_runs(args.study, [f for f, _ in ROLES if getattr(args, f)])
        except FigureError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        for flag, run in picks.items():
            setattr(args, flag, run)
        listed = args.compare + [getattr(args, flag) for flag, _ in ROLES]
        args.compare = args.compare + [run for run in others if run not in listed]
    if (args.records_only or args.carry) and not args.evidence:
        p.error(f"--{'records-only' if args.records_only else 'carry'} goes with --evidence "
                f"STUDY_DIR")
    if not (args.curves or args.evidence) and not (args.nonsyn and args.factor and args.vae):
        p.error("give --nonsyn, --factor and --vae (the thesis figures), or --study DIR, or "
                "--curves RUN ..., or --evidence STUDY_DIR")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out or f"figures/{datetime.now():%Y%m%d-%H%M%S}")
    blocked = next((d for d in [out, *out.parents] if d.exists() and not d.is_dir()), None)
    if blocked is not None:
        p.error(f"--out {out}: {blocked} is a file; give a folder for the figures")
    sources = [getattr(args, flag) for flag, _ in ROLES] + args.compare + (args.curves or []) \
        + (args.band or []) + [args.celeba]
    try:  # the run folders' own files first: --force does not lift that
        check_out_outside(out, [RunFolder(Path(run)) for run in sources if run])
    except FigureError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    held = sorted(n for n in FIGURE_NAMES if (out / n).exists()) if out.is_dir() else []
    if held and not args.force:
        print(f"error: --out {out} already holds figures ({', '.join(held[:4])}"
              f"{', ...' if len(held) > 4 else ''}); add --force to replace them, or leave out "
              f"--out for a new folder", file=sys.stderr)
        return 2
    new = not out.exists()
    try:
        wrote = (_curves(args, out) if args.curves else _evidence(args, out) if args.evidence
                 else _thesis(args, out))
    except (FigureError, ConfigError, EvidenceError) as err:
        print(f"error: {err}", file=sys.stderr)
        _remove_if_empty(out, new)
        return 2
    except MemoryError:
        print(f"error: out of memory while making the figures; nothing in {out} was changed. "
              f"Free some memory (other jobs, a larger machine), then run figures.py again",
              file=sys.stderr)
        _remove_if_empty(out, new)
        return 3
    except OSError as err:
        _remove_if_empty(out, new)
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        print(f"error: {'no space left on device' if full else err.strerror or err} while "
              f"writing the figures{f' ({err.filename})' if err.filename else ''}; nothing in "
              f"{out} was changed. " + ("Free some space, then run figures.py again" if full
                                        else "Choose a writable --out"), file=sys.stderr)
        return 3 if full else 2
    print(f"wrote {out}/: {wrote}")
    return 0


def _remove_if_empty(out, new):
    """A failed command leaves no empty --out folder it made (an empty figures/<date-time>)."""
    if new:
        try:
            out.rmdir()
        except OSError:
            pass  # not empty, or gone: leave it


@contextmanager
def staged(out):
    """A temporary folder inside ``out`` that receives one set of figures; its files move into
    ``out`` only once all of them are written, so a failure partway leaves ``out`` as it was
    (not two sets of figures mixed). The temporary folder is removed either way."""
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".figures-", suffix=".tmp", dir=out))
    try:
        yield work
        for path in sorted(work.rglob("*")):
            if path.is_file():
                target = out / path.relative_to(work)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _curves(args, out):
    folders = [RunFolder(r) for r in args.curves]
    band = [RunFolder(r) for r in args.band or []]
    for folder in folders + band:
        check_kind(folder, "--curves", NONSYN)
    check_out_outside(out, folders + band)
    with staged(out) as work:
        points = curve_figures(folders, work, args.curve_steps)
        if band:
            inside, total = band_table(folders, band, work, args.curve_steps)
    return (f"curves_thesis.png ({points} points per run), curves_per_step.png, curves.md"
            + (f", curves_vs_band.md ({inside} of {total} anchors inside the band)" if band
               else ""))


def _evidence(args, out):
    study = Path(args.evidence)
    if not (study / "study.json").is_file():
        raise FigureError(f"--evidence {study} has no study.json: not a study.py folder")
    check_out_outside(out, [RunFolder(p) for p in study.iterdir() if p.is_dir()])
    finished = finished_runs(study)
    if args.carry:
        check_out_outside(Path(args.carry), [RunFolder(p) for p in study.iterdir() if p.is_dir()])
        bank, drop = plan_carry(study, args.carry)  # checked before anything is written
    if args.records_only and not finished and not args.carry:
        raise FigureError(f"--evidence {study} has no finished trial yet: nothing to copy")
    if finished or not args.records_only:
        with staged(out) as work:
            wrote = "" if args.records_only else write_evidence(study, work, args.at) + ", "
            export_records([(folder.name, folder) for folder in finished], work, at=(args.at,))
    else:
        wrote = ""
    wrote += (f"runs/ ({len(finished)} finished runs' config.json, metrics.jsonl, "
              f"metrics.json, ground-truth summaries and final weights)")
    return wrote + (f"; {write_carry(args.carry, bank, drop)}" if args.carry else "")


def _thesis(args, out):
    roles = [RunFolder(args.nonsyn), RunFolder(args.factor), RunFolder(args.vae)]
    compared = [RunFolder(run) for run in args.compare]
    celeba = [("CelebA", RunFolder(args.celeba))] if args.celeba else []
    for (flag, _), folder in zip(ROLES, roles, strict=True):
        check_kind(folder, f"--{flag}", dataset=FACTOR_DATASETS)
    for folder in compared:
        check_kind(folder, "--compare")
    if celeba:
        check_kind(celeba[0][1], "--celeba", dataset="celeba")
    check_out_outside(out, roles + compared + [folder for _, folder in celeba])
    titled = run_titles(roles + compared)
    runs, listed = titled[:3], titled[3:]
    nonsyn = runs[0][1]
    history = bool(nonsyn.traversals()) or not has_model(nonsyn)  # else: final weights only
    logged = (nonsyn.path / nonsyn.LOG).is_file() or not has_model(nonsyn)
    with staged(out) as work:
        frames = write_gif(nonsyn, work / "traversals.gif") if history else 0
        comparison_figure(runs[:2], work / "latents.png")
        comparison_figure(runs[2:], work / "VAE_traversals.png")
        labelled_traversal(nonsyn, work / "traversal_labelled.png")
        points = loss_plot(nonsyn, work / "plots.png", args.loss_steps) if logged else 0
        if celeba:
            faces_figure(celeba[0][1], work / "faces_celeba.png")
        comparison_table(runs + listed + celeba, work)
        export_records(runs + celeba, work)
    for missing, what in ((not history, "traversals.gif needs the traversal images saved over "
                           "training"), (not logged, f"plots.png needs its {nonsyn.LOG}")):
        if missing:
            log.warning("warning: %s; %s holds the final weights without them: not drawn (the "
                        "other figures come from the weights)", what, nonsyn)
    return (("" if not history else f"traversals.gif ({frames} frames), ")
            + "latents.png, VAE_traversals.png, traversal_labelled.png"
            + ("" if not logged else f", plots.png ({points} points)")
            + f"{', faces_celeba.png' if args.celeba else ''}, comparison.md, comparison.json, "
            f"runs/ (each run's config.json, metrics.jsonl, metrics.json)")


if __name__ == "__main__":
    sys.exit(main())
