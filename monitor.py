"""The live visdom monitor: loss curves, best-set frequencies and the latest traversal of a run.

visdom is optional and imported only when a run asks for live plots (``--viz_on True`` or
``--metric test``); metrics.jsonl has every logged value whether or not a server answers.
"""
import logging
import time
import warnings

import numpy as np
import torch

log = logging.getLogger(__name__)


class VisdomMonitor:
    """Live plots in visdom, as the original: one window per loss term (``recon``, ``kl``,
    ``syn``, ``total``, and FactorVAE's ``tc``, ``d_loss``) plus the latest traversal image in
    env ``<run>``, and one "% of steps in the best set" window per latent in env
    ``<run>_latents``.

    Values are gathered as device tensors every ``gather_every`` steps and sent every
    ``push_every`` steps in one batch, so the training step never waits on the host. A server
    that is down at start, or stops answering, costs one warning; the run goes on, keeps what it
    gathered (up to MAX_PENDING points) and tries to reconnect at most RETRIES times, at most
    once every RETRY_SECONDS. metrics.jsonl keeps every logged value in any case.
    """

    RETRIES = 20
    RETRY_SECONDS = 30.0
    MAX_PENDING = 5000

    def __init__(self, run_name, port, gather_every, push_every, z_dim, server="http://localhost"):
        self.env, self.latent_env = run_name, f"{run_name}_latents"
        self.server, self.port = server, port
        self.gather_every, self.push_every, self.z_dim = gather_every, push_every, z_dim
        self.names, self.pending = None, []  # pending: (step, values (n,), best_freq (z,))
        self.vis, self.retries_left, self.last_attempt = None, 0, 0.0
        try:
            import visdom
        except ImportError as err:
            warnings.warn(f"visdom is not installed ({err}); training goes on without live "
                          f"plots, metrics.jsonl has every logged value", stacklevel=2)
            return
        self._visdom = visdom
        error = self._connect()
        if error is not None:
            self._lost(f"visdom is not reachable at {server}:{port} ({error}); training goes on. "
                       f"Start the server (python -m visdom.server -port {port}) and the run "
                       f"connects within {self.RETRY_SECONDS:.0f} s")

    @property
    def enabled(self):
        return self.vis is not None or self.retries_left > 0

    def _connect(self):
        self.last_attempt = time.monotonic()
        try:
            self.vis = self._visdom.Visdom(server=self.server, port=self.port, env=self.env,
                                           raise_exceptions=True, use_incoming_socket=False)
        except Exception as err:  # requests' ConnectionError and the like
            self.vis = None
            return err
        return None

    def _lost(self, message):
        warnings.warn(f"{message}; metrics.jsonl has every logged value", stacklevel=3)
        self.vis, self.retries_left = None, self.RETRIES

    def _ready(self):
        """Connected now, or reconnected by a (bounded, rate-limited) retry."""
        if self.vis is not None:
            return True
        if self.retries_left <= 0 or time.monotonic() - self.last_attempt < self.RETRY_SECONDS:
            return False
        self.retries_left -= 1
        if self._connect() is not None:
            return False
        log.info("visdom connected at %s:%s, env %s", self.server, self.port, self.env)
        return True

    def gather(self, step, values, best_freq):
        """Keep this step's values (dict of 0-dim tensors) and the per-latent best frequency."""
        if step % self.gather_every or not self.enabled:
            return
        self.names = list(values)
        self.pending.append((step, torch.stack([v.detach().float() for v in values.values()]),
                             best_freq.detach().float().clone()))
        del self.pending[:-self.MAX_PENDING]
        if step % self.push_every == 0:
            self.push()

    def push(self):
        """Send everything gathered since the last successful push (one host sync)."""
        if not self.pending or not self._ready():
            return
        steps = np.array([p[0] for p in self.pending], dtype=np.float64)
        values = torch.stack([p[1] for p in self.pending]).cpu().numpy()  # T, n_values
        freq = torch.stack([p[2] for p in self.pending]).cpu().numpy() * 100  # T, z
        try:
            for i, name in enumerate(self.names):
                self.vis.line(X=steps, Y=values[:, i], env=self.env, win=name, update="append",
                              opts=dict(title=name, xlabel="iteration", ylabel=name))
            for j in range(self.z_dim):
                self.vis.line(X=steps, Y=freq[:, j], env=self.latent_env, win=f"z{j}",
                              update="append", opts=dict(title=f"z{j}: % of steps in the best set",
                                                         xlabel="iteration", ylabel="%"))
        except Exception as err:
            self._lost(f"visdom stopped answering ({err}); training goes on, retrying every "
                       f"{self.RETRY_SECONDS:.0f} s at most {self.RETRIES} times")
            return
        self.pending.clear()

    def image(self, pixels, step):
        """Show the latest traversal grid (uint8 array, H x W or H x W x 3) in one window."""
        if self.vis is None:
            return
        chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        try:
            self.vis.image(chw, env=self.env, win="traversal",
                           opts=dict(title=f"traversal, step {step}", caption=f"step {step}"))
        except Exception as err:
            self._lost(f"visdom stopped answering ({err}); training goes on")
