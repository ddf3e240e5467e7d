"""Small shared helpers: atomic files, run folders, provenance, and the optional visdom monitor."""
import json
import logging
import os
import platform
import subprocess
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@contextmanager
def atomic_file(path):
    """Yield a binary file that replaces ``path`` only once fully written and synced; on any
    error the previous ``path`` stays as it was and the temporary file is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path, data):
    with atomic_file(path) as f:
        f.write(data)


def atomic_torch_save(obj, path):
    """torch.save through atomic_file: a kill mid-write leaves the previous file intact."""
    with atomic_file(path) as f:
        torch.save(obj, f)


def write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def git_commit():
    """The commit of the code being run, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions():
    import numpy

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "numpy": numpy.__version__}
    try:
        from importlib.metadata import version, PackageNotFoundError
        for name in ("visdom", "tqdm", "matplotlib", "pillow"):
            try:
                versions[name] = version(name)
            except PackageNotFoundError:
                versions[name] = None
    except ImportError:
        pass
    return versions


def rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class VisdomMonitor:
    """Live loss plots in visdom, as the original: ``recon``, ``kl``, ``syn`` (and the objective's
    other terms) in env ``<run>``, and one "% of steps in the best set" window per latent in env
    ``<run>_latents``.

    Values are gathered as device tensors every ``gather_every`` steps and sent every
    ``push_every`` steps in one batch, so the training step never waits on the host. A missing
    or failing server costs one warning; training goes on and metrics.jsonl keeps everything.
    """

    def __init__(self, run_name, port, gather_every, push_every, z_dim, server="http://localhost"):
        self.env, self.latent_env = run_name, f"{run_name}_latents"
        self.gather_every, self.push_every, self.z_dim = gather_every, push_every, z_dim
        self.steps, self.values, self.best_freq = [], [], []
        self.vis = None
        try:
            import visdom
        except ImportError as err:
            warnings.warn(f"visdom is not installed ({err}); training goes on without live "
                          f"plots, metrics.jsonl has every logged value")
            return
        try:
            self.vis = visdom.Visdom(server=server, port=port, env=self.env,
                                     raise_exceptions=True, use_incoming_socket=False)
        except Exception as err:  # ConnectionError and the like: the server is not there
            warnings.warn(f"visdom is not reachable at {server}:{port} ({err}); training goes "
                          f"on without live plots, metrics.jsonl has every logged value. Start "
                          f"the server with: python -m visdom.server -port {port}")

    @property
    def active(self):
        return self.vis is not None

    def gather(self, step, values, best_freq):
        """Keep this step's values (dict of 0-dim tensors) and the per-latent best frequency."""
        if not self.active or step % self.gather_every:
            return
        self.steps.append(step)
        self.values.append(torch.stack([v.detach().float() for v in values.values()]))
        self.names = list(values)
        self.best_freq.append(best_freq.detach().float())
        if step % self.push_every == 0:
            self.push()

    def push(self):
        if not self.active or not self.steps:
            return
        x = torch.tensor(self.steps, dtype=torch.float64)
        y = torch.stack(self.values).cpu()  # T, n_values
        freq = torch.stack(self.best_freq).cpu() * 100  # T, z
        self.steps, self.values, self.best_freq = [], [], []
        try:
            for i, name in enumerate(self.names):
                self.vis.line(X=x, Y=y[:, i], env=self.env, win=name, update="append",
                              opts=dict(title=name, xlabel="iteration", ylabel=name))
            for j in range(self.z_dim):
                self.vis.line(X=x, Y=freq[:, j], env=self.latent_env, win=f"z{j}", update="append",
                              opts=dict(title=f"z{j}: % of steps in the best set",
                                        xlabel="iteration", ylabel="%"))
        except Exception as err:
            warnings.warn(f"visdom push failed ({err}); live plots stop here, metrics.jsonl "
                          f"keeps every logged value")
            self.vis = None
