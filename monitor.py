"""The live visdom monitor: loss curves, best-set frequencies and the latest traversal of a run.

visdom is optional and imported only when a run asks for live plots (``--viz_on True`` or
``--metric test``); metrics.jsonl has every logged value whether or not a server answers.
"""
import logging
import queue
import threading
import time
import urllib.parse
import warnings

import numpy as np
import torch

log = logging.getLogger(__name__)


class VisdomMonitor:
    """Live plots in visdom, as the original: one window per loss term (``recon``, ``kl``,
    ``syn``, ``total``, and FactorVAE's ``tc``, ``d_loss``) plus the latest traversal image in
    env ``<run>``, and one "% of steps in the best set" window per latent in env
    ``<run>_latents``.

    Values are gathered as device tensors every ``gather_every`` steps and handed over every
    ``push_every`` steps (one host read). Every request to the server runs on one background
    thread with a TIMEOUT, fed through a bounded queue: a server that is down, hangs or answers
    errors never blocks a training step or a signal. It costs one warning; the sender keeps
    what it could not send (up to MAX_PENDING points) and tries to reconnect at most RETRIES
    times, at most once every RETRY_SECONDS.
    """

    RETRIES = 20
    RETRY_SECONDS = 30.0
    MAX_PENDING = 5000
    TIMEOUT = 5.0  # seconds for one request
    QUEUE = 64  # batches waiting for the sender; beyond, the training thread keeps them
    CLOSE_SECONDS = 5.0  # at the end of a run, how long the last points may take to go out

    def __init__(self, run_name, port, gather_every, push_every, z_dim, server="http://localhost"):
        self.env, self.latent_env = run_name, f"{run_name}_latents"
        self.server, self.port = server, port
        self.url = f"{server}:{port}/env/{urllib.parse.quote(self.env)}"  # where the plots are
        self.gather_every, self.push_every, self.z_dim = gather_every, push_every, z_dim
        self.names, self.gathered = None, []  # gathered: (step, values (n,), best_freq (z,))
        self.enabled = False
        try:
            import requests
            import visdom
        except ImportError as err:
            warnings.warn(f"visdom is not installed ({err}); training goes on without live "
                          f"plots, metrics.jsonl has every logged value", stacklevel=2)
            return
        self.enabled = True
        self._client_class = _client_class(visdom, requests, self.TIMEOUT)
        self._queue = queue.Queue(self.QUEUE)
        # The sender's own state, touched by its thread only.
        self._vis, self._unsent, self._retries_left, self._last_attempt = None, [], 0, 0.0
        self._down = False
        self._thread = threading.Thread(target=self._serve, name="visdom-sender", daemon=True)
        self._thread.start()

    # --- the training thread ------------------------------------------------------------------

    def gather(self, step, values, best_freq):
        """Keep this step's values (dict of 0-dim tensors) and the per-latent best frequency."""
        if step % self.gather_every or not self.enabled:
            return
        self.names = list(values)
        self.gathered.append((step, torch.stack([v.detach().float() for v in values.values()]),
                              best_freq.detach().float().clone()))
        del self.gathered[:-self.MAX_PENDING]
        if step % self.push_every == 0:
            self.push()

    def push(self):
        """Hand everything gathered to the sender (one host read); never waits for it."""
        if not self.enabled or not self.gathered:
            return
        batch = ("lines", list(self.names),
                 np.array([g[0] for g in self.gathered], dtype=np.float64),
                 torch.stack([g[1] for g in self.gathered]).cpu().numpy(),  # T, n_values
                 torch.stack([g[2] for g in self.gathered]).cpu().numpy() * 100)  # T, z
        try:
            self._queue.put_nowait(batch)
        except queue.Full:  # the sender is stuck on the server: keep them for the next push
            return
        self.gathered.clear()

    def image(self, pixels, step):
        """Show the latest traversal grid (uint8 array, H x W or H x W x 3) in one window."""
        if self.enabled:
            try:
                self._queue.put_nowait(("image", pixels, step))
            except queue.Full:
                pass  # a later traversal replaces it anyway

    def close(self):
        """Push what is left and give the sender at most CLOSE_SECONDS to send it."""
        if not self.enabled:
            return
        self.push()
        deadline = time.monotonic() + self.CLOSE_SECONDS
        try:
            self._queue.put(None, timeout=self.CLOSE_SECONDS)
        except queue.Full:
            return
        self._thread.join(max(0.0, deadline - time.monotonic()))

    # --- the sender thread --------------------------------------------------------------------

    def _serve(self):
        if self._connect():
            self._announce()
        else:
            self._lost(f"visdom is not reachable at {self.server}:{self.port} "
                       f"({self._error}); training goes on. Start the server (python -m "
                       f"visdom.server -port {self.port}) and the run connects within "
                       f"{self.RETRY_SECONDS:.0f} s; its plots will be at {self.url}")
        while (item := self._queue.get()) is not None:
            if item[0] == "lines":
                self._unsent.append(item[1:])
                while sum(len(batch[1]) for batch in self._unsent) > self.MAX_PENDING:
                    self._unsent.pop(0)
                if self._ready():
                    self._send_lines()
            elif self._vis is not None:
                self._send_image(*item[1:])

    def _connect(self):
        self._last_attempt = time.monotonic()
        try:
            self._vis = self._client_class(server=self.server, port=self.port, env=self.env,
                                           raise_exceptions=True, use_incoming_socket=False)
        except Exception as err:  # refused, timed out, an error status: all mean "not now"
            self._vis, self._error = None, self._client_class.failure or err
            return False
        return True

    def _lost(self, message):
        if not self._down:  # one warning per outage
            warnings.warn(f"{message}; metrics.jsonl has every logged value", stacklevel=2)
        self._vis, self._retries_left, self._down = None, self.RETRIES, True

    def _ready(self):
        """Connected now, or reconnected by a (bounded, rate-limited) retry."""
        if self._vis is not None:
            return True
        if self._retries_left <= 0 or time.monotonic() - self._last_attempt < self.RETRY_SECONDS:
            return False
        self._retries_left -= 1
        if not self._connect():
            return False
        self._down = False
        self._announce()
        return True

    def _announce(self):
        log.info("visdom: this run's plots are at %s (best-set frequency per latent: %s_latents)",
                 self.url, self.url)

    def _send_lines(self):
        try:
            while self._unsent:
                names, steps, values, freq = self._unsent[0]
                for i, name in enumerate(names):
                    self._vis.line(X=steps, Y=values[:, i], env=self.env, win=name,
                                   update="append",
                                   opts=dict(title=name, xlabel="iteration", ylabel=name))
                for j in range(self.z_dim):
                    self._vis.line(X=steps, Y=freq[:, j], env=self.latent_env, win=f"z{j}",
                                   update="append",
                                   opts=dict(title=f"z{j}: % of steps in the best set",
                                             xlabel="iteration", ylabel="%"))
                self._unsent.pop(0)
        except Exception as err:
            self._lost(f"visdom stopped answering ({self._client_class.failure or err}); "
                       f"training goes on, retrying every {self.RETRY_SECONDS:.0f} s at most "
                       f"{self.RETRIES} times")

    def _send_image(self, pixels, step):
        chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        try:
            self._vis.image(chw, env=self.env, win="traversal",
                            opts=dict(title=f"traversal, step {step}", caption=f"step {step}"))
        except Exception as err:
            self._lost(f"visdom stopped answering ({self._client_class.failure or err}); "
                       f"training goes on")


def _client_class(visdom, requests, timeout):
    """visdom.Visdom whose every request has a timeout and treats an error status (a proxy's
    501, say) as a failure, through the hook visdom documents for wrappers (_handle_post)."""

    class Client(visdom.Visdom):
        failure = None  # what went wrong last, in words (visdom re-raises a bare ConnectionError)

        def _handle_post(self, url, data=None):
            try:
                response = self.session.post(url, data=data or {}, timeout=timeout)
            except requests.Timeout:
                Client.failure = f"no answer within {timeout:g} s"
                raise
            except requests.RequestException as err:
                Client.failure = f"{type(err).__name__}"
                raise
            if response.status_code >= 400:
                Client.failure = f"it answered HTTP {response.status_code}"
                raise requests.HTTPError(Client.failure)
            return response.text
    return Client
