"""The Solver: owns one run (model, optimisers, data, objective, outputs) and its training loop.

Datasets differ by a ModelSpec (channels, hidden width, likelihood); objectives (``--metric``)
differ only by their train step:
  Test_gt, test  Non-Syn VAE: recon + KL, plus the synergy penalty alpha * KL(worst set)
                 applied as a second Adam step (``two-step``, faithful) or in one loss (``joint``)
  VAE, BVAE      recon + beta * KL (beta = 1 for VAE); synergy logged, not optimised
  Factor         FactorVAE: recon + KL + gamma * TC with a density-ratio discriminator
Every train step returns (values, best): a dict of detached 0-dim tensors and the bool best-set
mask. They are read on the host only at log time, so the step never synchronises with the device.
"""
import json
import logging
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dataset import (FACTOR_NAMES, ORIENTATION_VALUES, SCALE_VALUES, EpochSampler, grid_axes,
                     load_dataset)
from metrics import EVAL_SEED, evaluate, library_versions, lookup
from model import MODEL_SPECS, Discriminator, kl_loss, permute_dims
from synergy import synergy_penalty
from utils import (VisdomMonitor, atomic_torch_save, git_commit, package_versions, rng_state,
                   set_rng_state, write_json)

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoints/last.pt"
CHECKPOINT_FORMAT = 1


class Solver:
    def __init__(self, config, run_dir, checkpoint=None):
        self.config = c = config
        self.run_dir = Path(run_dir)
        self.device = torch.device("cuda" if c.cuda and torch.cuda.is_available() else "cpu")
        torch.manual_seed(c.seed)

        self.data = load_dataset(c.dataset, c.data_dir, c.grid, c.celeba_crop).to(self.device)
        if not self.data.has_factors:
            log.info("%s has no ground-truth factors: ground-truth plots and disentanglement "
                     "metrics are skipped", c.dataset)
        spec = MODEL_SPECS[c.dataset]
        self.model = spec.build(c.z_dim).to(self.device)
        self.reconstruction_loss = spec.reconstruction_loss
        self.optim = torch.optim.Adam(self.model.parameters(), lr=c.lr_VAE,
                                      betas=(c.beta1_VAE, c.beta2_VAE))
        self.D = self.optim_D = None
        if c.metric == "Factor":
            self.D = Discriminator(c.z_dim).to(self.device)
            self.optim_D = torch.optim.Adam(self.D.parameters(), lr=c.lr_D,
                                            betas=(c.beta1_D, c.beta2_D))
        self.train_step = {"VAE": self.step_vae, "BVAE": self.step_vae, "Factor": self.step_factor,
                           "Test_gt": self.step_nonsyn, "test": self.step_nonsyn}[c.metric]

        self.sampler = EpochSampler(len(self.data), c.batch_size, c.seed, 0, self.device)
        # A second, independent stream: the synergy batch of --sample sample, FactorVAE's z'.
        self.partner = EpochSampler(len(self.data), c.batch_size, c.seed, 1, self.device)
        picker = torch.Generator().manual_seed(c.seed)
        self.test_index = torch.cat([torch.zeros(1, dtype=torch.long),
                                     torch.randint(len(self.data), (c.nb_test - 1,), generator=picker)])

        self.step = 0
        self.elapsed = 0.0
        self.best_counts = torch.zeros(c.z_dim, device=self.device)  # steps each latent was in B
        if checkpoint is not None:
            self.load_state(checkpoint)
        self.viz = None
        if c.viz_on:
            self.viz = VisdomMonitor(self.run_dir.name, c.viz_port, c.viz_il_iter, c.viz_la_iter,
                                     c.z_dim)
        self._stop_signal = None

    # --- objectives -------------------------------------------------------------------------

    def _batch(self, sampler):
        return self.data.images(sampler.indices(self.step))

    def _elbo_terms(self, x):
        """Forward pass of a batch: (recon, kl, mu, logvar, z)."""
        logits, mu, logvar, z = self.model(x)
        return self.reconstruction_loss(logits, x), kl_loss(mu, logvar), mu, logvar, z

    def step_nonsyn(self):
        """Non-Syn VAE step. two-step: Adam on recon + KL, then Adam on alpha * KL(worst) with
        the synergy gradient taken at the pre-step parameters (or, with --sample sample, from a
        fresh encoder pass on a second batch after the first step) and zero gradients on the
        decoder, whose Adam moments still move as in PyTorch 0.4.1. joint: one Adam step on
        recon + KL + alpha * KL(worst)."""
        c = self.config
        recon, kl, mu, logvar, _ = self._elbo_terms(self._batch(self.sampler))
        if c.sample == "sample":
            x_syn = self._batch(self.partner)
            if c.update == "joint":
                mu_s, logvar_s = self.model.encoder(x_syn)
                syn, best = synergy_penalty(mu_s, logvar_s, c.omega, c.alpha)
        else:
            syn, best = synergy_penalty(mu, logvar, c.omega, c.alpha)

        self.optim.zero_grad(set_to_none=True)
        if c.update == "joint":
            (recon + kl + syn).backward()
            self.optim.step()
        else:
            encoder = list(self.model.encoder.parameters())
            if c.sample == "no_sample":
                syn_grads = torch.autograd.grad(syn, encoder, retain_graph=True)
            (recon + kl).backward()
            self.optim.step()
            if c.sample == "sample":
                mu_s, logvar_s = self.model.encoder(x_syn)
                syn, best = synergy_penalty(mu_s, logvar_s, c.omega, c.alpha)
                syn_grads = torch.autograd.grad(syn, encoder)
            for p, g in zip(encoder, syn_grads, strict=True):
                p.grad = g
            for p in self.model.decoder.parameters():
                p.grad.zero_()
            self.optim.step()
        return dict(recon=recon.detach(), kl=kl.detach(), syn=syn.detach(),
                    total=(recon + kl + syn).detach()), best

    def step_vae(self):
        """Plain VAE (beta = 1) or beta-VAE: recon + beta * KL. Synergy is only measured."""
        c = self.config
        beta = c.beta if c.metric == "BVAE" else 1.0
        recon, kl, mu, logvar, _ = self._elbo_terms(self._batch(self.sampler))
        loss = recon + beta * kl
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        self.optim.step()
        syn, best = synergy_penalty(mu.detach(), logvar.detach(), c.omega, c.alpha)
        return dict(recon=recon.detach(), kl=kl.detach(), syn=syn, total=loss.detach()), best

    def step_factor(self):
        """FactorVAE: recon + KL + gamma * TC, TC estimated by the discriminator's logit gap;
        then one discriminator step on detached z against dimension-shuffled z' from a second
        batch. Synergy is only measured."""
        c = self.config
        recon, kl, mu, logvar, z = self._elbo_terms(self._batch(self.sampler))
        self.D.requires_grad_(False)
        d_z = self.D(z)  # B, 2
        tc = (d_z[:, 0] - d_z[:, 1]).mean()
        loss = recon + kl + c.gamma * tc
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        self.optim.step()
        self.D.requires_grad_(True)

        with torch.no_grad():
            mu2, logvar2 = self.model.encoder(self._batch(self.partner))
            z_perm = permute_dims(mu2 + torch.randn_like(mu2) * (0.5 * logvar2).exp())
        zeros = torch.zeros(len(z), dtype=torch.long, device=self.device)
        d_loss = 0.5 * (F.cross_entropy(self.D(z.detach()), zeros)
                        + F.cross_entropy(self.D(z_perm), torch.ones_like(zeros)))
        self.optim_D.zero_grad(set_to_none=True)
        d_loss.backward()
        self.optim_D.step()
        syn, best = synergy_penalty(mu.detach(), logvar.detach(), c.omega, c.alpha)
        return dict(recon=recon.detach(), kl=kl.detach(), syn=syn, tc=tc.detach(),
                    d_loss=d_loss.detach(), total=loss.detach()), best

    # --- the loop ----------------------------------------------------------------------------

    def train(self):
        """Train up to config.steps. Returns True when finished, False when stopped by a signal."""
        c = self.config
        self.model.train()
        start_step, started = self.step, time.perf_counter() - self.elapsed
        handlers = self._install_signal_handlers()
        metrics_file = open(self.run_dir / "metrics.jsonl", "a")
        try:
            with logging_redirect_tqdm(), tqdm(total=c.steps, initial=self.step, unit="step",
                                               dynamic_ncols=True, desc="training") as bar:
                while self.step < c.steps and self._stop_signal is None:
                    values, best = self.advance()
                    bar.update(1)
                    self.elapsed = time.perf_counter() - started
                    if self.step % c.log_interval == 0 or self.step == c.steps:
                        self._log(metrics_file, values, best)
                    if self.step % c.save_interval == 0 or self.step == c.steps:
                        self.save_traversal()
                        self.save_checkpoint()
                    if self.data.has_factors and (self.step % c.gt_interval == 0
                                                  or self.step == c.steps):
                        self._evaluate(metrics_file)
        finally:
            metrics_file.close()
            self._restore_signal_handlers(handlers)
            if self.viz is not None:
                self.viz.push()
        if self._stop_signal is not None:
            self.save_checkpoint()
            name = signal.Signals(self._stop_signal).name
            log.warning("%s at step %d: checkpoint saved in %s. Resume with:\n  python run.py "
                        "--resume %s", name, self.step, self.run_dir / CHECKPOINT, self.run_dir)
            return False
        log.info("Finished %d steps in %.1f s (%d this session); outputs in %s", self.step,
                 self.elapsed, self.step - start_step, self.run_dir)
        return True

    def advance(self):
        """One step of the loop: the objective's update, then the step count, best-set counts
        and visdom gathering (device-side only). Returns the step's (values, best)."""
        values, best = self.train_step()
        self.step += 1
        self.best_counts += best
        if self.viz is not None:
            self.viz.gather(self.step, values, self.best_counts / self.step)
        return values, best

    def _log(self, metrics_file, values, best):
        row = {name: float(v) for name, v in values.items()}
        best = best.cpu()
        record = dict(step=self.step, **row,
                      best=best.nonzero().flatten().tolist(), worst=(~best).nonzero().flatten().tolist(),
                      best_freq=[round(f, 6) for f in (self.best_counts / self.step).tolist()],
                      seconds=round(self.elapsed, 3))
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        terms = " | ".join(f"{k} {v:.4g}" for k, v in row.items())
        log.info("step %d/%d | %s | best %s | %.1f s", self.step, self.config.steps, terms,
                 record["best"], self.elapsed)

    def _evaluate(self, metrics_file):
        started = time.perf_counter()
        results = self.evaluate_representation(self.config.metric_names)
        if not results:
            return
        record = dict(step=self.step, scores={n: r["score"] for n, r in results.items()},
                      eval_seconds=round(time.perf_counter() - started, 3))
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        if self.step == self.config.steps:
            self.record_evaluation(results, source="end of training")

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
        state = dict(format=CHECKPOINT_FORMAT, step=self.step, elapsed=self.elapsed,
                     config=self.config.to_dict(), model=self.model.state_dict(),
                     optim=self.optim.state_dict(), best_counts=self.best_counts,
                     rng=rng_state(self.device))
        if self.D is not None:
            state.update(D=self.D.state_dict(), optim_D=self.optim_D.state_dict())
        path = self.run_dir / CHECKPOINT
        path.parent.mkdir(exist_ok=True)
        atomic_torch_save(state, path)

    def load_state(self, state):
        self.model.load_state_dict(state["model"])
        self.optim.load_state_dict(state["optim"])
        if self.D is not None:
            self.D.load_state_dict(state["D"])
            self.optim_D.load_state_dict(state["optim_D"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.best_counts = state["best_counts"].to(self.device)
        set_rng_state(state["rng"], self.device)

    # --- figures -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_all(self, batch_size=None):
        """Posterior means of every image in dataset order: float32 array (N, z_dim).

        On the CPU small batches keep the activations in cache (96: ~65 s for the full grid on
        2 cores, against ~160 s at 2048); a GPU wants large ones."""
        batch_size = batch_size or (4096 if self.device.type == "cuda" else 96)
        was_training = self.model.training
        self.model.eval()
        mus = []
        for start in range(0, len(self.data), batch_size):
            if self._stop_signal is not None:  # a Ctrl-C should not wait for the whole grid
                self.model.train(was_training)
                return None
            index = torch.arange(start, min(start + batch_size, len(self.data)), device=self.device)
            mus.append(self.model.encoder(self.data.images(index))[0].cpu())
        self.model.train(was_training)
        return torch.cat(mus).numpy()

    @torch.no_grad()
    def save_traversal(self):
        """alpha_<alpha>_traversal_<step>.png: test images, their reconstructions, then one row
        per latent traversed over linspace(-3, 3, nb_test) from test image 0's mean."""
        c = self.config
        was_training = self.model.training
        self.model.eval()
        x = self.data.images(self.test_index.to(self.device))  # T, 1, 64, 64
        mu, _ = self.model.encoder(x)
        recon = torch.sigmoid(self.model.decoder(mu))
        z = mu[:1].repeat(c.z_dim * c.nb_test, 1).view(c.z_dim, c.nb_test, c.z_dim)
        z[torch.arange(c.z_dim), :, torch.arange(c.z_dim)] = torch.linspace(-3, 3, c.nb_test,
                                                                             device=self.device)
        traversal = torch.sigmoid(self.model.decoder(z.view(-1, c.z_dim)))
        self.model.train(was_training)
        rows = torch.cat([x, recon, traversal]).view(c.z_dim + 2, c.nb_test, *x.shape[1:])
        pixels = image_grid(rows.cpu())
        Image.fromarray(pixels).save(self.run_dir / f"alpha_{c.alpha}_traversal_{self.step}.png")
        if self.viz is not None:
            self.viz.image(pixels, self.step)

    def evaluate_representation(self, metric_names, plot=True):
        """Encode the whole grid once; from those means draw the ground-truth plot and compute
        the disentanglement metrics. Returns {metric: result}, or None when interrupted."""
        started = time.perf_counter()
        codes = self.encode_all()
        if codes is None:
            log.warning("evaluation at step %d skipped: interrupted", self.step)
            return None
        sizes = self.data.factor_sizes
        plot_path = self.run_dir / f"alpha_{self.config.alpha}_gt_{self.step}.png"
        summary_path = plot_path.with_suffix(".npz")
        if plot and not (plot_path.exists() and summary_path.exists()):  # never redrawn over
            axes = grid_axes(self.data.grid)
            summary = mean_activations(codes.reshape(*sizes, self.config.z_dim),
                                       scales=SCALE_VALUES[axes[1]],
                                       orientations=ORIENTATION_VALUES[axes[2]])
            if not summary_path.exists():
                np.savez(summary_path, **summary)
            if not plot_path.exists():
                save_ground_truth_plot(summary, plot_path, f"{self.config.metric}, step {self.step}")
        encoded = time.perf_counter()
        results = evaluate(lookup(codes, sizes), sizes, metric_names) if metric_names else {}
        if results:
            log.info("step %d | %s | encoding %.1f s, metrics %.1f s", self.step,
                     " | ".join(f"{name} {r['score']:.3f}" for name, r in results.items()),
                     encoded - started, time.perf_counter() - encoded)
        return results

    def record_evaluation(self, results, source):
        """Append one evaluation, with its protocols and library versions, to metrics.json."""
        path = self.run_dir / "metrics.json"
        report = json.loads(path.read_text()) if path.exists() else {"evaluations": []}
        report["evaluations"].append(dict(
            step=self.step, source=source, scores=results, eval_seed=EVAL_SEED,
            data=dict(source=self.data.source, grid=self.data.grid, factors=list(FACTOR_NAMES),
                      factor_sizes=list(self.data.factor_sizes), representation="posterior mean"),
            versions=library_versions(), at=datetime.now().isoformat(timespec="seconds")))
        write_json(path, report)


def run_metadata(config, data):
    """What config.json records besides the settings: data source and size, versions, commit."""
    return dict(config=config.to_dict(), data_source=data.source, n_images=len(data),
                versions=package_versions(), git_commit=git_commit(),
                factors=list(FACTOR_NAMES) if data.has_factors else None)


# --- plotting ---------------------------------------------------------------------------------

def image_grid(rows, padding=2):
    """Images (R, C, ch, H, W) in [0, 1] -> one uint8 grid (H', W') or (H', W', 3), black padding."""
    n_rows, n_cols, ch, h, w = rows.shape
    canvas = torch.zeros(ch, n_rows * (h + padding) + padding, n_cols * (w + padding) + padding)
    for r in range(n_rows):
        for col in range(n_cols):
            top, left = padding + r * (h + padding), padding + col * (w + padding)
            canvas[:, top:top + h, left:left + w] = rows[r, col]
    pixels = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return pixels[:, :, 0] if ch == 1 else pixels


ACTIVE_VARIANCE = 1e-2  # a latent whose mean varies less than this over the data is inactive


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
    """The original's "mean activation" figure from mean_activations(). One row per active
    latent: a posX x posY heatmap of mu_j averaged over shape, scale and orientation (one colour
    scale for all rows); mu_j against scale and against orientation, one line per shape (shared
    y-limits per column)."""
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
        fig.savefig(path)
        return
    pos = summary["pos"][..., active]  # posX, posY, A
    by_scale = summary["by_scale"][..., active]  # shape, scale, A
    by_rotation = summary["by_rotation"][..., active]  # shape, orientation, A
    limit = np.abs(pos).max()
    ylims = [(a.min() - 0.1 * np.ptp(a) - 1e-3, a.max() + 0.1 * np.ptp(a) + 1e-3)
             for a in (by_scale, by_rotation)]
    for row, j in enumerate(active):
        ax_pos, ax_scale, ax_rot = axes[row]
        image = ax_pos.imshow(pos[:, :, row].T, cmap="coolwarm", vmin=-limit, vmax=limit,
                              origin="upper", extent=(0, 1, 1, 0))
        ax_pos.set_ylabel(f"z{j}")
        for shape_index, name in enumerate(("square", "ellipse", "heart")):
            ax_scale.plot(scales, by_scale[shape_index, :, row], label=name)
            ax_rot.plot(orientations, by_rotation[shape_index, :, row], label=name)
        ax_scale.set_ylim(*ylims[0])
        ax_rot.set_ylim(*ylims[1])
    axes[0, 0].set_title("pos")
    axes[0, 1].set_title("scale")
    axes[0, 2].set_title("rotation")
    axes[0, 2].legend(fontsize="small")
    axes[-1, 0].set_xlabel("posX")
    axes[-1, 1].set_xlabel("scale")
    axes[-1, 2].set_xlabel("orientation (rad)")
    fig.colorbar(image, ax=axes[:, 0], shrink=0.8)
    fig.savefig(path)
