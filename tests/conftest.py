"""Shared test setup: the repository root on sys.path, small deterministic torch, and the
fixtures several test files use (an action at a given training step, a metrics-log reader,
a synthetic CelebA zip)."""
import collections
import hashlib
import io
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIXTURES = Path(__file__).resolve().parent / "data"

import dataset  # noqa: E402  (needs ROOT on sys.path)
import solver as solver_module  # noqa: E402
from runfolder import RunFolder  # noqa: E402

# run.py flags of the tests' short runs: 6 steps on the reduced grid on the CPU, no metrics,
# a 200-image evaluation sample (QUICK); batches of 8 and no ground truth before step 1000,
# the length given by each test (TINY)
QUICK = ["--grid", "reduced", "--batch_size", "16", "--steps", "6", "--log-interval", "2",
         "--save-interval", "3", "--gt-interval", "6", "--no-cuda", "--nb-test", "4",
         "--eval-metrics", "none", "--eval-sample", "200"]
TINY = ["--grid", "reduced", "--batch_size", "8", "--log-interval", "2", "--save-interval", "4",
        "--gt-interval", "1000", "--no-cuda", "--nb-test", "2", "--eval-metrics", "none",
        "--eval-sample", "200"]


_RENDERS = collections.OrderedDict()  # (shape, digest of the classes) -> rendered uint8 images
_RENDER = dataset.render_dsprites


def _render_once(classes, chunk=512):
    """``dataset.render_dsprites`` for this test session: a pure function of its classes, so a
    grid of up to 12,000 images (the reduced grid of every short run) is drawn once per session
    and handed out as a copy; most runs of the tests would draw it again (over a third of
    the quick tier's time). Larger ones (the full grid) are drawn each time, to bound memory."""
    key = np.ascontiguousarray(np.asarray(classes, dtype=np.int64))
    if len(key) > 12_000:
        return _RENDER(classes, chunk)
    key = (key.shape, hashlib.blake2b(key.tobytes(), digest_size=16).digest())
    if key not in _RENDERS:
        _RENDERS[key] = _RENDER(classes, chunk)  # a bad input raises here and is not kept
        if len(_RENDERS) > 4:
            _RENDERS.popitem(last=False)
    return _RENDERS[key].copy()


dataset.render_dsprites = _render_once


@pytest.fixture(autouse=True)
def _few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def at_step(monkeypatch):
    """``at_step(n, action)``: every Solver made afterwards calls ``action(solver)`` once, right
    after its n-th training step of this process (e.g. to send SIGTERM or stop a server)."""
    def install(n, action):
        init = solver_module.Solver.__init__

        def patched(self, *args, **kwargs):
            init(self, *args, **kwargs)
            train_step, count = self.train_step, [0]

            def counted():
                out = train_step()
                count[0] += 1
                if count[0] == n:
                    action(self)
                return out
            self.train_step = counted
        monkeypatch.setattr(solver_module.Solver, "__init__", patched)
    return install


def run_cli(tmp_path, name, *flags, base=QUICK):
    """run.py's main in this process on the procedural dSprites: (exit code, run folder)."""
    from run import main
    code = main([*base, "--output_dir", str(tmp_path), "--run-name", name, "--data-dir",
                 str(no_data(tmp_path)), *flags])
    return code, tmp_path / name


# --- the original trainer's replay (tests/data/original_replay_s120.npz) ---------------------------

FIXTURE = FIXTURES / "original_replay_s120.npz"


def images(packed):
    """uint8 (B, 512) packed bits -> float (B, 1, 64, 64)."""
    return torch.from_numpy(np.unpackbits(packed, axis=-1).reshape(-1, 1, 64, 64).astype(np.float32))


class ReplayBatches:
    """The fixture's batch of every step, and its partner batch (--sample sample)."""

    def __init__(self, original):
        self.original = original

    def train(self, step):
        return images(self.original["batches"][step])

    def partner(self, step):
        return images(self.original["partner_batches"][step])


class ReplayNoise:
    """The fixture's noise slabs, one per reparameterised sample, in the order they are drawn."""

    def __init__(self, original):
        self.slabs = torch.from_numpy(original["noise"])
        self.drawn = 0

    def __call__(self, like):
        slab = self.slabs[self.drawn]
        self.drawn += 1
        assert slab.shape == like.shape
        return slab


def in_module_order(original, prefix):
    """The fixture's tensors under ``prefix`` (original key names such as ``encoder.9.weight``),
    sorted as the modules are registered: network, layer index, weight before bias."""
    names = [k[len(prefix):] for k in original if k.startswith(prefix)]

    def key(name):
        net, index, kind = re.fullmatch(r"(encoder|decoder)\.(\d+)\.(weight|bias)", name).groups()
        return net == "decoder", int(index), kind == "bias"
    return [torch.from_numpy(original[prefix + n]) for n in sorted(names, key=key)]


def records(run_dir, kind="train"):
    """The ``kind`` records ("train" or "eval") of a run's metrics.jsonl."""
    return RunFolder(run_dir).records(kind)


def layer_dtypes(model):
    """The dtypes the convolution and linear layers of ``model`` compute in: a set, filled as the
    model runs."""
    seen = set()
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
            module.register_forward_hook(lambda m, inputs, out: seen.add(out.dtype))
    return seen


def cmdline(pid):
    """The command line of process ``pid`` (NUL-separated, as /proc has it), "" once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def photo(seed):
    """A 178x218 test photo: dark background, a white band on rows 100..139, a red band on
    columns 40..59, a green band on rows 0..14 (only the full-height crops keep it)."""
    rng = np.random.default_rng(seed)
    pixels = np.full((218, 178, 3), 20, dtype=np.uint8)
    pixels += rng.integers(0, 10, pixels.shape, dtype=np.uint8)
    pixels[100:140] = 255
    pixels[:, 40:60] = (255, 0, 0)
    pixels[:15] = (0, 255, 0)
    return Image.fromarray(pixels)


def jpeg_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_celeba_zip(path, n_images, broken=()):
    """A small img_align_celeba.zip of ``photo``s; the 1-based indices in ``broken`` hold bytes
    that are not a JPEG."""
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(1, n_images + 1):
            data = b"\xff\xd8 not a jpeg" if i in broken else jpeg_bytes(photo(i))
            archive.writestr(f"img_align_celeba/{i:06d}.jpg", data)
    return path


def no_data(parent):
    """An empty --data-dir under ``parent``: the procedural dSprites, whatever ./ holds."""
    folder = parent / "no-data"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
