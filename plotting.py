"""Drawing: the traversal grid, the ground-truth "mean activation" plot and what it shows, and
the labels that name the factor each latent tracks. matplotlib is imported only to draw.
"""
import numpy as np
import torch

from dataset import FACTOR_NAMES

ACTIVE_VARIANCE = 1e-2  # a latent whose mean varies less than this over the data is inactive
FACTOR_LABELS = dict(shape="shape", scale="scale", orientation="rotation", posX="position x",
                     posY="position y")
EXPLAINED = 0.1  # a factor must explain this share of a latent's variance to name it


def image_grid(rows, padding=2):
    """Images (R, C, ch, H, W) in [0, 1] -> one uint8 grid (H', W') or (H', W', 3), with white
    padding as the original's ``save_image(..., pad_value=1)``."""
    n_rows, n_cols, ch, h, w = rows.shape
    canvas = torch.ones(ch, n_rows * (h + padding) + padding, n_cols * (w + padding) + padding)
    for r in range(n_rows):
        for col in range(n_cols):
            top, left = padding + r * (h + padding), padding + col * (w + padding)
            canvas[:, top:top + h, left:left + w] = rows[r, col]
    pixels = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return pixels[:, :, 0] if ch == 1 else pixels


def label_rows(pixels, labels, padding=2, margin=None):
    """``image_grid``'s pixels with a white left margin naming each row (e.g. "original",
    "reconstruction", "z0: position x", ...); the plain grid stays the run's own file."""
    from PIL import Image, ImageDraw
    height = pixels.shape[0]
    row = (height - padding) / len(labels)
    margin = margin or 8 + 6 * max(len(label) for label in labels)
    image = Image.fromarray(pixels).convert("RGB")
    canvas = Image.new("RGB", (image.width + margin, height), "white")
    canvas.paste(image, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for r, label in enumerate(labels):
        draw.text((4, padding + r * row + row / 2), label, fill="black", anchor="lm")
    return np.asarray(canvas)


def traversal_labels(z_dim, factors=None):
    """Row labels of the traversal grid: the test images, their reconstructions, one row per
    latent (with the factor it tracks, where known)."""
    return ["original", "reconstruction"] + [
        f"z{j}" + (f": {factors[j]}" if factors else "") for j in range(z_dim)]


def mean_activations(mu, scales, orientations):
    """What the ground-truth plot shows, from posterior means mu over the factor grid (shape,
    scale, orientation, posX, posY, z_dim): a few small arrays, saved beside the plot."""
    z_dim = mu.shape[-1]
    return dict(
        variance=mu.reshape(-1, z_dim).var(0),  # z
        pos=mu.mean(axis=(0, 1, 2)),  # posX, posY, z
        by_scale=mu.mean(axis=(2, 3, 4)),  # shape, scale, z
        by_rotation=mu.mean(axis=(1, 3, 4)),  # shape, orientation, z
        scales=np.asarray(scales), orientations=np.asarray(orientations),
        **{f"marginal_{name}": mu.mean(axis=tuple(a for a in range(5) if a != axis))  # values, z
           for axis, name in enumerate(FACTOR_NAMES)})


def save_ground_truth_plot(summary, path, title=""):
    """The original's "mean activation" figure from mean_activations(), saved as PNG to ``path``
    (a path or a binary file) and returned. One row per active latent: a heatmap of mu_j averaged over shape, scale and
    orientation, drawn as the original (``imshow(mean_pos[:, :, j])``: rows = posX, columns =
    posY), one colour range [min, max] over all latents; mu_j against scale and against
    orientation, one line per shape (shared y-limits per column). Each row is labelled with its
    latent and the factor it tracks (``latent_labels``); the colour bar with what it shows."""
    from matplotlib.figure import Figure

    scales, orientations = summary["scales"], summary["orientations"]
    active = np.flatnonzero(summary["variance"] > ACTIVE_VARIANCE)
    n_rows = max(len(active), 1)
    fig = Figure(figsize=(9, 2.2 * n_rows + 0.6), layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(n_rows, 3, squeeze=False)
    if not len(active):
        for ax in axes[0]:
            ax.set_axis_off()
        axes[0, 1].text(0.5, 0.5, f"no active latent (variance of mu > {ACTIVE_VARIANCE})",
                        ha="center", va="center")
        fig.savefig(path, format="png")
        return fig
    pos = summary["pos"][..., active]  # posX, posY, A
    by_scale = summary["by_scale"][..., active]  # shape, scale, A
    by_rotation = summary["by_rotation"][..., active]  # shape, orientation, A
    vmin, vmax = summary["pos"].min(), summary["pos"].max()
    known = all(f"marginal_{name}" in summary for name in FACTOR_NAMES)
    names = latent_labels(summary) if known else [None] * len(summary["variance"])
    ylims = [(a.min() - 0.1 * np.ptp(a) - 1e-3, a.max() + 0.1 * np.ptp(a) + 1e-3)
             for a in (by_scale, by_rotation)]
    for row, j in enumerate(active):
        ax_pos, ax_scale, ax_rot = axes[row]
        image = ax_pos.imshow(pos[:, :, row], cmap="coolwarm", vmin=vmin, vmax=vmax,
                              origin="upper", extent=(0, 1, 1, 0))
        tracks = {"none": "no single factor"}.get(names[j], names[j])
        ax_pos.set_ylabel(f"z{j}: {tracks}" if tracks else f"z{j}", fontsize="medium")
        for shape_index, name in enumerate(("square", "ellipse", "heart")):
            ax_scale.plot(scales, by_scale[shape_index, :, row], label=name)
            ax_rot.plot(orientations, by_rotation[shape_index, :, row], label=name)
        ax_scale.set_ylim(*ylims[0])
        ax_rot.set_ylim(*ylims[1])
    axes[0, 0].set_title("mean over position\n(rows: x, columns: y)", fontsize="medium")
    axes[0, 1].set_title("mean against scale", fontsize="medium")
    axes[0, 2].set_title("mean against rotation", fontsize="medium")
    axes[0, 2].legend(fontsize="small")
    axes[-1, 0].set_xlabel("position y")
    axes[-1, 1].set_xlabel("scale")
    axes[-1, 2].set_xlabel("orientation (rad)")
    bar = fig.colorbar(image, ax=axes[:, 0], shrink=0.8)
    bar.set_label("posterior mean of the latent")
    fig.savefig(path, format="png")
    return fig


def factor_shares(summary):
    """(shares, active): per latent (rows) and factor (columns, FACTOR_NAMES' order), the share
    of the latent's variance over the data that the factor's conditional means explain, and
    which latents are active (the ground-truth plot's own cut, ACTIVE_VARIANCE). An inactive
    latent's row is 0.

    Rotation is measured within each shape: the share of E[z | shape, rotation]'s variance
    beyond E[z | shape]'s. A square looks the same every 90 degrees and an ellipse every 180,
    so a latent that tracks rotation follows a different curve per shape, and those curves
    cancel in the mean over shapes (rotation's pooled conditional mean; what a summary saved
    without ``by_rotation`` falls back to)."""
    variance = np.asarray(summary["variance"], dtype=float)
    active = variance > ACTIVE_VARIANCE
    shares = np.zeros((len(variance), len(FACTOR_NAMES)))
    for j in np.flatnonzero(active):
        for f, name in enumerate(FACTOR_NAMES):
            shares[j, f] = summary[f"marginal_{name}"][:, j].var() / variance[j]
        if "by_rotation" in summary:  # shape x orientation cells, all of the same size
            shares[j, FACTOR_NAMES.index("orientation")] = (
                summary["by_rotation"][..., j].var() - summary["marginal_shape"][:, j].var()
            ) / variance[j]
    return shares, active


def latent_factors(summary):
    """Per latent, (factor it tracks, share of its variance over the data that the factor's
    conditional means explain; ``factor_shares``): ("inactive", 0) for a latent the
    ground-truth plot leaves out, ("none", best share) where no factor explains EXPLAINED of
    it."""
    shares, active = factor_shares(summary)
    factors = []
    for row, is_active in zip(shares, active, strict=True):
        if not is_active:
            factors.append(("inactive", 0.0))
            continue
        best = int(row.argmax())
        label = FACTOR_LABELS[FACTOR_NAMES[best]] if row[best] >= EXPLAINED else "none"
        factors.append((label, float(row[best])))
    return factors


def latent_labels(summary):
    """Per latent, the factor whose conditional means explain most of its variance over the
    data ("none" below EXPLAINED, "inactive" for a latent the ground-truth plot leaves out)."""
    return [label for label, _ in latent_factors(summary)]


# --- the thesis's claims, decided by rules written before the five-seed results were read -------
# Each rule reads a run's final ground-truth summary through ``factor_shares``; the thresholds
# and their reasons are in docs/results.md ("Claims decided by rules").
SEPARATE = 0.7  # a latent has learned a factor alone: the factor explains >= this of it ...
CROSS = 0.15  # ... and the other position axis <= this (a 45-degree pair gives ~0.5 / 0.5)
SCALE = 0.5  # scale learned: scale explains the larger part of one latent
ROTATION = 0.2  # a rotation latent: rotation its best factor, explaining >= twice EXPLAINED


def _column(shares, name):
    return shares[:, FACTOR_NAMES.index(name)]


def xy_separate(shares, active):
    """x and y learned separately: one latent with position x >= SEPARATE and position y <=
    CROSS, and another the other way round."""
    x, y = _column(shares, "posX"), _column(shares, "posY")
    return bool((active & (x >= SEPARATE) & (y <= CROSS)).any()
                and (active & (y >= SEPARATE) & (x <= CROSS)).any())


def scale_learned(shares, active):
    """Scale learned: an active latent whose variance scale explains >= SCALE of."""
    return bool((active & (_column(shares, "scale") >= SCALE)).any())


def rotation_latents(shares, active):
    """The active latents whose best factor is rotation, explaining >= ROTATION of them."""
    rotation = _column(shares, "orientation")
    return [j for j in np.flatnonzero(active)
            if shares[j].argmax() == FACTOR_NAMES.index("orientation")
            and rotation[j] >= ROTATION]


def rotation_in_two(shares, active):
    """Rotation learned, in two latents (the thesis's figure): at least two rotation latents."""
    return len(rotation_latents(shares, active)) >= 2


def uninformative_latent(shares, active):
    """An uninformative latent (the thesis's z7): at least one latent inactive, its posterior
    mean varying less than ACTIVE_VARIANCE over the data."""
    return bool((~active).any())


def entangled(shares, active):
    """Entangled (the thesis's plain VAE): active latents, none of which a single factor
    explains >= SEPARATE of (no latent learned a factor alone)."""
    return bool(active.any() and not (shares[active].max(axis=1) >= SEPARATE).any())


# (key, the claim as a reader says it, its rule)
CLAIMS = (("xy", "x and y learned separately", xy_separate),
          ("scale", "scale learned", scale_learned),
          ("rotation", "rotation learned, in two latents", rotation_in_two),
          ("uninformative", "an uninformative latent", uninformative_latent),
          ("entangled", "entangled (no latent learns a factor alone)", entangled))


def claims_met(summary):
    """{claim key: whether the run's ground-truth ``summary`` meets it} (CLAIMS)."""
    shares, active = factor_shares(summary)
    return {key: rule(shares, active) for key, _, rule in CLAIMS}
