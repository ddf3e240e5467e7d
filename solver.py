"""The Solver: owns one run (model, optimisers, data, outputs) and its training loop.

Datasets differ by a ModelSpec (channels, hidden width, likelihood); objectives (``--metric``)
differ only by their train step, one each in objectives.py (its table ``OBJECTIVES``: Non-Syn
VAE and its three updates, VAE / beta-VAE, FactorVAE, beta-TCVAE, DIP-VAE-I/II, AnnealedVAE).
The Solver builds what they share (networks, the VAE's Adam, FactorVAE's discriminator where
the table asks for it, the batches) and runs the chosen objective's step.
Every train step returns (values, best): a dict of detached 0-dim tensors (every objective's
with ``i_max``, the alpha-free synergy measure at ``measure_omega``) and the bool best-set mask.
They are read on the host only at log time, so the step never synchronises with the device.
Settings live in config.py, the run folder in runfolder.py, evaluation in representation.py.
"""
import logging
import signal
import threading
import time

import torch
from PIL import Image
from tqdm.contrib.logging import logging_redirect_tqdm

from config import NONSYN, OBJECTIVE_SETTINGS, flag_of
from dataset import Batches, load_dataset
from model import (MEMORY_FORMAT, MODEL_SPECS, Discriminator, build_model, init_as_pytorch_041,
                   kl_loss)
from monitor import VisdomMonitor
from objectives import OBJECTIVES, discriminator_optimiser, vae_optimiser
from precision import autocast, pick_device
from representation import (evaluate_representation, evaluation_report, log_measures,
                            sample_measures, test_index, traversal_pixels)
from runfolder import RunFolder
from synergy import kl_per_latent, synergy_penalty, worst_set_kl
from utils import Diverged, atomic_file, progress, rng_state, set_rng_state

log = logging.getLogger(__name__)


class Solver:
    """One run. ``batches`` (an object with ``train(step)`` and ``partner(step)`` returning
    image batches) and ``noise`` (``noise(mu)``: standard normal noise like mu, for every
    reparameterised sample) default to the run's own data and RNG; a replay hands in its own.
    ``device`` is the one run.py chose for the start (default: the one ``config`` asks for)."""

    def __init__(self, config, folder, checkpoint=None, batches=None, noise=torch.randn_like,
                 memory_format=MEMORY_FORMAT, device=None):
        self.config = c = config
        self.folder = folder if isinstance(folder, RunFolder) else RunFolder(folder)
        self.device = device or pick_device(c)
        torch.manual_seed(c.seed)

        self.data = load_dataset(c.dataset, c.data_dir, c.grid, c.celeba_crop, c.scream_image).to(self.device)
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
        self.test_index = test_index(c, len(self.data))

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
            forecast = Forecast(self)
            with logging_redirect_tqdm(), progress(c.steps, self.step, "training") as bar:
                while self.step < c.steps and self._stop_signal is None:
                    values, best = self.advance()
                    bar.update(1)
                    forecast.step()
                    self.elapsed = time.perf_counter() - started
                    self.eval_pending = self.data.has_factors and (
                        self.step % c.gt_interval == 0 or self.step == c.steps)
                    if self.step % c.log_interval == 0 or self.step == c.steps:
                        self._log(log_file, values, best)
                    if self.eval_pending:
                        evaluated = time.perf_counter()
                        self._evaluate(log_file)
                        forecast.evaluated(time.perf_counter() - evaluated)
                    if self.step % c.save_interval == 0 or self.step == c.steps:
                        self.save_checkpoint()  # after the evaluation: it records whether it ran
                        self.save_traversal()
                    elif self.keeps_step():
                        self.save_checkpoint()
        finally:
            try:
                self.folder.close_log(log_file)
            finally:
                self._restore_signal_handlers(handlers)
        if self._stop_signal is not None and self.finished():  # after the last write
            log.warning("%s after the last step: nothing was left to stop; the run is finished",
                        signal.Signals(self._stop_signal).name)
            self._stop_signal = None
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
        own = [flag_of(name) for name in OBJECTIVE_SETTINGS[self.config.metric]
               if name not in ("omega", "lambda_d_factor")]  # the objective's weights
        smaller = f" (or a smaller {' / '.join(own)})" if own else ""
        raise Diverged(f"{' and '.join(terms)} became NaN or infinite at step {step}; training "
                       f"stopped and {kept}. Try a lower {flag_of('lr_VAE')}{smaller} in a new "
                       f"run")

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

    def finished(self):
        """True once the final checkpoint is written (all steps trained, the final evaluation
        done): a signal from then on has nothing left to stop."""
        return (self.step >= self.config.steps and not self.eval_pending
                and self.checkpoint_step == self.step)

    def keeps_step(self):
        return self.config.keep_interval > 0 and self.step % self.config.keep_interval == 0

    def save_checkpoint(self):
        """Write the checkpoint (at a step of --keep-interval, also as that step's kept one),
        unless a loss or a weight went non-finite (Diverged): the last good checkpoint is never
        replaced by a broken one."""
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
        self.folder.save_checkpoint(state, keep=self.keeps_step())
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

    def save_traversal(self):
        """<stem>_traversal_<step>.png (``representation.traversal_pixels``): drawing
        it leaves the training stream, and with it resume, untouched."""
        pixels = traversal_pixels(self.model, self.data, self.config, self.step, self.test_index)
        with atomic_file(self.folder.traversal_path(self.config, self.step)) as f:
            Image.fromarray(pixels).save(f, format="PNG")
        if self.viz is not None:
            self.viz.image(pixels, self.step)


class Forecast:
    """The expected wall-clock of a session, logged once from the first steps' rate (steps 2 on:
    the first is warm-up) and once more after the first ground-truth evaluation, with how to
    shorten it: a bare ``python run.py`` trains 300,000 steps for hours."""

    MEASURE_S, MEASURE_STEPS = 10.0, 200  # measure over this long, or this many steps

    def __init__(self, solver):
        self.solver, self.first = solver, solver.step
        self.since, self.told, self.evaluations_told = None, False, False
        self.rate = None

    def _evaluations_left(self):
        c, step = self.solver.config, self.solver.step
        if not self.solver.data.has_factors:
            return 0
        return c.steps // c.gt_interval - step // c.gt_interval + (c.steps % c.gt_interval != 0)

    def step(self):
        if self.told:
            return
        now, done = time.perf_counter(), self.solver.step - self.first
        if done == 1:
            self.since = now
            return
        left = self.solver.config.steps - self.solver.step
        if self.since is None or left <= 0 or (now - self.since < self.MEASURE_S
                                               and done - 1 < self.MEASURE_STEPS):
            return
        self.told, self.rate = True, (done - 1) / (now - self.since)
        c = self.solver.config
        evaluations = self._evaluations_left()
        log.info("expected: %s steps more at %.3g step/s ≈ %s of training%s; shorten with "
                 "--steps N%s", f"{left:,}", self.rate, _duration(left / self.rate),
                 f", plus {evaluations} ground-truth evaluation(s) (every {c.gt_interval:,} "
                 f"steps; their time is logged after the first)" if evaluations else "",
                 ", a larger --gt-interval or --eval-metrics none" if evaluations else "")

    def evaluated(self, seconds):
        if self.evaluations_told or self.rate is None:
            return
        self.evaluations_told = True
        left, evaluations = self.solver.config.steps - self.solver.step, self._evaluations_left()
        if evaluations:
            log.info("expected: an evaluation takes %s; with %d more, ≈ %s left in all",
                     _duration(seconds), evaluations,
                     _duration(left / self.rate + evaluations * seconds))


def _duration(seconds):
    """'45 s', '12 min', '3 h 05 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"
