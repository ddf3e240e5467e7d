"""Datasets. dSprites: the official npz when present, otherwise an exact-geometry procedural
renderer. CelebA: the aligned photos, preprocessed once into a cached uint8 array.

dSprites images are kept as packed bits (512 bytes per 64x64 image: 377 MB for the full grid)
on the training device and unpacked to float only for the batch being used. Factor order, class
indices and latent values are those of the official release: C-order over
(color 1, shape 3, scale 6, orientation 40, posX 32, posY 32), posY fastest.
"""
import contextlib
import ctypes
import functools
import hashlib
import io
import logging
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from utils import atomic_file, derived_seed, disk_full_named, progress, usable_cpus

log = logging.getLogger(__name__)

DSPRITES_FILE = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
DSPRITES_URL = ("https://github.com/deepmind/dsprites-dataset/raw/master/"
                "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz")
DSPRITES_MD5 = "7da33b31b13a06f4b04a70402ce90c2e"
FACTOR_NAMES = ("shape", "scale", "orientation", "posX", "posY")
FULL_SIZES = (3, 6, 40, 32, 32)
GRIDS = ("full", "reduced")
# The reduced grid keeps every shape and scale, every 4th orientation (0..36, no duplicate of
# orientation 0) and 8 positions spanning each axis: 11,520 images, one original epoch.
REDUCED_AXES = (np.arange(3), np.arange(6), np.arange(0, 40, 4),
                np.round(np.linspace(0, 31, 8)).astype(np.int64),
                np.round(np.linspace(0, 31, 8)).astype(np.int64))
SCALE_VALUES = np.linspace(0.5, 1.0, 6)
ORIENTATION_VALUES = np.linspace(0.0, 2 * np.pi, 40)  # index 39 = 2 pi, the same image as 0
IMAGE_SIZE = 64
PACKED_BYTES = IMAGE_SIZE * IMAGE_SIZE // 8


class DatasetError(RuntimeError):
    """A dataset file is missing, corrupt or inconsistent; the message says what to do."""


# --- procedural rendering ---------------------------------------------------------------------

_PATCH = 31  # every shape lies within 14 px of its centre: render a 31x31 window around it


def _heart_y(c):
    """Heart curve Y(t) = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t written in c = cos t."""
    c2 = c * c
    return 13 * c - 5 * (2 * c2 - 1) - 2 * (4 * c2 * c - 3 * c) - (8 * c2 * c2 - 8 * c2 + 1)


_HEART_Y_MIN = -17.0  # Y at t = pi
_HEART_Y_MAX = float(_heart_y(np.cos(np.linspace(0.0, np.pi, 200001))).max())


def _inside(shape, u, v, s):
    """Pixel-centre test in the shape's own frame (u right, v up); s: scale, broadcastable."""
    if shape == 0:  # square, side 19.2 * scale
        return (u.abs() <= 9.6 * s) & (v.abs() <= 9.6 * s)
    if shape == 1:  # ellipse, semi-axes 12.77 x 7.21 (times scale)
        return (u / (12.77 * s)).square() + (v / (7.21 * s)).square() <= 1.0
    # Heart X = 16 sin^3 t, Y(t): bounding box 19.2 x 19.2 (times scale), 0.25*scale px low.
    # Each vertical line |X| < 16 meets the curve at sin t = (|X|/16)^(1/3), once with cos t > 0
    # (top) and once with cos t < 0 (bottom): inside means between the two.
    x = (u * (32.0 / (19.2 * s))).abs()
    y = (v + 0.25 * s) * ((_HEART_Y_MAX - _HEART_Y_MIN) / (19.2 * s)) + (_HEART_Y_MAX + _HEART_Y_MIN) / 2
    sin_t = (x / 16).clamp(max=1.0).pow(1.0 / 3.0)
    cos_t = (1 - sin_t.square()).clamp(min=0.0).sqrt()
    return (x <= 16) & (y <= _heart_y(cos_t)) & (y >= _heart_y(-cos_t))


def _render_chunk(classes):
    """classes: int64 tensor (n, 5) -> uint8 tensor (n, 64, 64)."""
    n = classes.shape[0]
    shape, scale_i, orient_i, pos_x, pos_y = classes.unbind(1)
    f64 = torch.float64
    scale = (0.5 + 0.1 * scale_i.to(f64))[:, None, None]  # n, 1, 1
    theta = orient_i.to(f64) * (2 * math.pi / 39)
    cx = 16 + 32 * pos_x.to(f64) / 31  # x grows to the right
    cy = 16 + 32 * pos_y.to(f64) / 31  # y grows downwards (row index)
    window = torch.arange(_PATCH)
    cols = (cx.floor().long() - _PATCH // 2)[:, None] + window  # n, P
    rows = (cy.floor().long() - _PATCH // 2)[:, None] + window  # n, P
    dx = (cols.to(f64) + 0.5 - cx[:, None])[:, None, :]  # n, 1, P
    dy = (cy[:, None] - rows.to(f64) - 0.5)[:, :, None]  # n, P, 1 (upwards)
    cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
    u = dx * cos + dy * sin  # n, P, P: rotate the pixel centre back by theta
    v = dy * cos - dx * sin
    patch = torch.zeros(n, _PATCH, _PATCH, dtype=torch.bool)
    for k in range(3):
        sel = (shape == k).nonzero().squeeze(1)
        if len(sel):
            patch[sel] = _inside(k, u[sel], v[sel], scale[sel])
    images = torch.zeros(n, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    images[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]] = patch.to(torch.uint8)
    return images


def render_dsprites(classes, chunk=512):
    """Render dSprites images from class indices.

    classes: int array (N, 5) of (shape, scale, orientation, posX, posY) class indices.
    Returns uint8 (N, 64, 64) of 0/1: a pixel is 1 when its centre lies inside the shape.
    """
    classes = torch.as_tensor(np.asarray(classes, dtype=np.int64))
    if classes.ndim != 2 or classes.shape[1] != 5:
        raise ValueError(f"classes must have shape (N, 5), got {tuple(classes.shape)}")
    if classes.min() < 0 or (classes.max(0).values >= torch.tensor(FULL_SIZES)).any():
        raise ValueError(f"class indices out of range for factor sizes {FULL_SIZES}")
    out = np.empty((len(classes), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for start in range(0, len(classes), chunk):
        out[start:start + chunk] = _render_chunk(classes[start:start + chunk]).numpy()
    return out


# --- grids --------------------------------------------------------------------------------------

def grid_axes(grid):
    """Class indices kept on each factor axis for ``grid`` ('full' or 'reduced')."""
    if grid == "full":
        return tuple(np.arange(n) for n in FULL_SIZES)
    if grid == "reduced":
        return REDUCED_AXES
    raise ValueError(f"unknown grid {grid!r}; choose from {GRIDS}")


def grid_classes(grid):
    """int64 (N, 5) class indices of the grid, in dataset order (posY fastest)."""
    mesh = np.meshgrid(*grid_axes(grid), indexing="ij")
    return np.stack([m.reshape(-1) for m in mesh], axis=1).astype(np.int64)


def latents_values(classes):
    """Official latents_values (N, 6): color, shape, scale, orientation, posX, posY."""
    classes = np.asarray(classes)
    values = np.empty((len(classes), 6), dtype=np.float64)
    values[:, 0] = 1.0
    values[:, 1] = classes[:, 0] + 1.0
    values[:, 2] = SCALE_VALUES[classes[:, 1]]
    values[:, 3] = ORIENTATION_VALUES[classes[:, 2]]
    values[:, 4] = np.linspace(0.0, 1.0, 32)[classes[:, 3]]
    values[:, 5] = np.linspace(0.0, 1.0, 32)[classes[:, 4]]
    return values


# --- the dataset --------------------------------------------------------------------------------

_BIT_SHIFTS = {}  # device -> tensor([7, ..., 0]): np.packbits order, most significant bit first


def _bit_shifts(device):
    if device not in _BIT_SHIFTS:  # made once per device: no host-to-device copy per batch
        _BIT_SHIFTS[device] = torch.arange(7, -1, -1, dtype=torch.uint8, device=device)
    return _BIT_SHIFTS[device]


def pack_images(images):
    """uint8 (N, 64, 64) of 0/1 -> uint8 (N, 512) packed bits."""
    return np.packbits(np.asarray(images, dtype=np.uint8).reshape(len(images), -1), axis=1)


def unpack_images(packed):
    """uint8 tensor (B, 512) on any device -> float32 tensor (B, 1, 64, 64) of 0/1."""
    bits = (packed[:, :, None] >> _bit_shifts(packed.device)) & 1  # B, 512, 8
    return bits.reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE).float()


@dataclass
class DSprites:
    """Packed images plus factors of one grid, in dataset order.

    packed: uint8 tensor (N, 512); classes: int64 array (N, 5); factor_sizes: grid shape
    (shape, scale, orientation, posX, posY); source: human-readable origin of the images.
    """
    packed: torch.Tensor
    classes: np.ndarray
    factor_sizes: tuple
    grid: str
    source: str
    has_factors = True

    def __len__(self):
        return self.packed.shape[0]

    def to(self, device):
        self.packed = self.packed.to(device)
        return self

    channels = 1

    def images(self, index, draw=None):
        """Float images (B, 1, 64, 64) for an index tensor on the data's device (``draw``: see
        DSpritesVariant; the plain images have no randomness)."""
        return unpack_images(self.packed[index])


# --- disentanglement_lib's dSprites variants ------------------------------------------------------

DSPRITES_VARIANTS = ("color_dsprites", "noisy_dsprites", "scream_dsprites")
SCREAM_URL = "https://upload.wikimedia.org/wikipedia/commons/f/f4/The_Scream.jpg"
SCREAM_THUMBNAIL = (350, 274)  # PIL's thumbnail: fits the picture within 350 x 274, aspect kept
# The draws of an evaluation (scores, plots, traversals): one stream for every run, keyed by
# the image's dataset index, so that every run is scored on the same coloured images.
VARIANT_EVAL_STREAM = 0
_MULTIPLIER = 0x45D9F3B  # of the 32-bit integer hash below (Thomas Mueller's constant)


def _hash32(x):
    """A 32-bit integer hash (xor-shift-multiply, two rounds) of int32 tensors, elementwise, in
    two's-complement arithmetic: products wrap modulo 2**32, and each right shift is made
    logical by a mask. ``tests/test_variants.py`` checks it against numpy's uint32."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MULTIPLIER
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MULTIPLIER
    return x ^ ((x >> 16) & 0xFFFF)


def _int32(value):
    """A Python integer's low 32 bits as an int32 value (two's complement)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


@functools.lru_cache(maxsize=8)
def _draw_hashes(count, device):
    return _hash32(torch.arange(count, dtype=torch.int32, device=device) ^ 0x2545F491)


def counter_uniform(stream, keys, count):
    """float32 (len(keys), count) uniform in [0, 1) with 16-bit resolution: draw j of key k in
    ``stream``, a pure function of (stream, k, j), computed on the keys' device with no
    generator state, so that an image's randomness is the same whatever batch it is in, and a
    resumed run redraws exactly what it would have drawn. Each 32-bit hash gives two draws."""
    keys = keys.to(torch.int64)
    stream_hash = _hash32(torch.tensor(_int32(int(stream)), dtype=torch.int32))
    high = ((keys >> 32) & 0xFFFFFFFF).to(torch.int32)  # int64 -> int32 keeps the low bits
    key_hash = _hash32((keys & 0xFFFFFFFF).to(torch.int32) ^ _hash32(high ^ stream_hash.to(
        keys.device)))
    pairs = _hash32(key_hash[:, None] ^ _draws(count, keys.device)[None, :])  # B, ceil(count/2)
    halves = torch.stack([pairs & 0xFFFF, (pairs >> 16) & 0xFFFF], 2).flatten(1)[:, :count]
    return halves.float() * 2.0 ** -16


def _draws(count, device):
    return _draw_hashes((count + 1) // 2, torch.device(device))


@dataclass
class DSpritesVariant(DSprites):
    """A dSprites variant of disentanglement_lib (``data/ground_truth/dsprites.py``): the same
    five factors and images, as 3 channels, with randomness drawn per image.

    color: the sprite times one colour per image, each channel uniform in [0.5, 1]; the
    background stays 0. noisy: min(sprite + noise, 1), the noise uniform in [0, 1] per pixel and
    channel. scream: a random 64x64 crop of the Scream painting (thumbnailed to fit 350x274)
    averaged with a random colour uniform in [0, 1]^3, the sprite's pixels inverted (1 - x).

    The randomness of a draw is ``counter_uniform(stream, key)``: training batches use their
    run's streams keyed by (step, position) (``Batches``); everything else (scores, plots,
    traversals, ``score``) the evaluation stream keyed by the image's dataset index."""
    variant: str = "color_dsprites"
    scream: torch.Tensor | None = None  # float (3, H, W) in [0, 1], for scream_dsprites
    channels = 3

    def to(self, device):
        super().to(device)
        if self.scream is not None:
            self.scream = self.scream.to(device)
        return self

    def images(self, index, draw=None):
        """Float images (B, 3, 64, 64) in [0, 1] for an index tensor on the data's device.
        ``draw``: (stream, step) of a training batch, its keys step * B + position; None: the
        evaluation stream keyed by ``index``."""
        sprite = unpack_images(self.packed[index]).expand(-1, 3, -1, -1)  # B, 3, 64, 64 of 0/1
        if draw is None:
            stream, keys = VARIANT_EVAL_STREAM, index
        else:
            stream, step = draw
            keys = step * len(index) + torch.arange(len(index), device=index.device)
        if self.variant == "color_dsprites":
            colour = 0.5 + 0.5 * counter_uniform(stream, keys, 3)
            return sprite * colour[:, :, None, None]
        if self.variant == "noisy_dsprites":
            noise = counter_uniform(stream, keys, 3 * IMAGE_SIZE * IMAGE_SIZE)
            return torch.clamp_max(sprite + noise.view(-1, 3, IMAGE_SIZE, IMAGE_SIZE), 1.0)
        u = counter_uniform(stream, keys, 5)
        height, width = self.scream.shape[1:]
        top = (u[:, 0] * (height - IMAGE_SIZE)).long()  # as randint(0, height - 64)
        left = (u[:, 1] * (width - IMAGE_SIZE)).long()
        offsets = torch.arange(IMAGE_SIZE, device=index.device)
        pixels = ((top[:, None] + offsets)[:, :, None] * width
                  + (left[:, None] + offsets)[:, None, :])  # B, 64, 64 into the flat painting
        patch = self.scream.flatten(1).index_select(1, pixels.flatten())  # 3, B * 64 * 64
        patch = patch.view(3, -1, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 1)
        background = (patch + u[:, 2:5, None, None]) / 2
        return torch.where(sprite == 1, 1 - background, background)


def load_scream(path):
    """The Scream painting as float (3, H, W) in [0, 1], thumbnailed to fit 350x274 as
    disentanglement_lib does, and its description; DatasetError (one line) without it."""
    if path is None:
        raise DatasetError(f"--dataset scream_dsprites needs --scream-image PATH: the Scream "
                           f"painting is not shipped; disentanglement_lib uses {SCREAM_URL} "
                           f"(download it and give its path)")
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"--scream-image {path}: no such file; give the Scream painting "
                           f"({SCREAM_URL})")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail(SCREAM_THUMBNAIL)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"--scream-image {path} cannot be read as an image "
                           f"({type(err).__name__}: {err}); give the Scream painting "
                           f"({SCREAM_URL})") from None
    if min(image.size) <= IMAGE_SIZE:
        raise DatasetError(f"--scream-image {path} is {image.size[0]}x{image.size[1]} after the "
                           f"350x274 thumbnail; its crops need more than 64 pixels each way")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return pixels.contiguous(), f"{path.name} (md5 {file_md5(path)}, {image.size[0]}x{image.size[1]})"


def data_identity(source):
    """What of a data source (config.json's ``data_source``) must stay the same over a run's
    resumes, wherever its files lie now: dSprites from the official file (with its MD5) or from
    the procedural renderer (a variant of either names its base last). None where the text
    cannot tell (CelebA's folder): nothing to compare."""
    base = source.rpartition(") of ")[2] if ") of " in source else source
    if match := re.match(r"official npz .* \(md5 (\w+)\)$", base):
        return f"the official dSprites file (md5 {match[1]})"
    if base.startswith("procedural renderer"):
        return "dSprites from the procedural renderer"
    return None


def load_variant(name, grid="full", data_dir=None, scream_image=None):
    """dSprites ``grid`` as the variant ``name`` (``DSpritesVariant``)."""
    scream, scream_text = load_scream(scream_image) if name == "scream_dsprites" else (None, "")
    base = load_dsprites(grid, data_dir)
    return DSpritesVariant(packed=base.packed, classes=base.classes,
                           factor_sizes=base.factor_sizes, grid=base.grid,
                           source=f"{name} (disentanglement_lib's definition"
                                  f"{', ' + scream_text if scream_text else ''}) of {base.source}",
                           variant=name, scream=scream)


def check_data_dir(data_dir):
    """A ``--data-dir`` that is not a folder is an error naming it, not a silent fallback."""
    if data_dir is None:
        return
    path = Path(data_dir)
    if not path.exists():
        raise DatasetError(f"--data-dir {path} does not exist; give the folder that holds "
                           f"{DSPRITES_FILE} (or CelebA), or leave --data-dir out to search ./ "
                           f"and ./datasets")
    if not path.is_dir():
        raise DatasetError(f"--data-dir {path} is a file, not a folder; give the folder that "
                           f"holds it")


def _candidate_dirs(data_dir):
    check_data_dir(data_dir)
    if data_dir is not None:
        return [Path(data_dir)]
    return [Path.cwd(), Path.cwd() / "datasets"]


def find_dsprites(data_dir=None):
    """Path of the official npz in ``data_dir`` (or ./ and ./datasets), or None. A path of that
    name that is not a readable file (a folder, a broken link) is an error, not a reason to fall
    back to the procedural dSprites."""
    for folder in _candidate_dirs(data_dir):
        path = folder / DSPRITES_FILE
        if path.is_file():
            return path
        if path.exists() or path.is_symlink():
            what = "a broken link" if not path.exists() else "not a file"
            raise DatasetError(f"{path} is {what}, so it cannot be read as the dSprites npz. "
                               f"Replace it with the file (or --download), or move it away to "
                               f"train on the procedural dSprites")
    return None


def file_md5(path, block=1 << 20):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _corrupt(path, why):
    return DatasetError(
        f"{path} is not a valid dSprites file ({why}). Delete it and run with --download to fetch "
        f"a fresh copy, or move it away to train on the procedural dSprites.")


def is_html_page(path):
    """True when ``path`` starts as an HTML page: what a failed download (a login, quota or
    error page) saves under the name of the file it was meant to fetch."""
    try:
        with open(path, "rb") as f:
            head = f.read(512).lstrip().lower()
    except OSError:
        return False
    return head.startswith((b"<!doctype html", b"<html"))


def read_official_npz(path, rows=None, chunk=16384):
    """Read the official npz into packed bits, streaming the 2.8 GB image array.

    rows: optional sorted int array of dataset indices to keep (e.g. a reduced grid).
    Returns (packed uint8 (n, 512), classes int64 (n, 5)). Raises DatasetError on a corrupt,
    truncated or inconsistent file.
    """
    n_full = int(np.prod(FULL_SIZES))
    if is_html_page(path):
        raise DatasetError(f"{path} is an HTML page, not the dSprites npz (a failed download "
                           f"saves a login or error page under that name). Delete it and run "
                           f"with --download to fetch the file, or move it away to train on "
                           f"the procedural dSprites.")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            missing = {"imgs.npy", "latents_classes.npy", "latents_values.npy"} - names
            if missing:
                raise _corrupt(path, f"missing arrays {sorted(missing)}")
            with archive.open("latents_classes.npy") as f:
                classes = np.load(f)
            if classes.shape != (n_full, 6) or not np.issubdtype(classes.dtype, np.integer):
                raise _corrupt(path, f"latents_classes has shape {classes.shape} and dtype "
                                     f"{classes.dtype}, expected ({n_full}, 6) integers")
            if not np.array_equal(classes[:, 1:], grid_classes("full")):
                raise _corrupt(path, "latents_classes is not in the official order")
            keep = np.arange(n_full) if rows is None else np.asarray(rows)
            packed = np.empty((len(keep), PACKED_BYTES), dtype=np.uint8)
            with archive.open("imgs.npy") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                if shape != (n_full, IMAGE_SIZE, IMAGE_SIZE) or dtype != np.uint8 or fortran:
                    raise _corrupt(path, f"imgs has shape {shape} and dtype {dtype}, expected "
                                         f"({n_full}, 64, 64) uint8")
                row_bytes = IMAGE_SIZE * IMAGE_SIZE
                for start in range(0, n_full, chunk):
                    count = min(chunk, n_full - start)
                    buf = f.read(count * row_bytes)
                    if len(buf) != count * row_bytes:
                        raise _corrupt(path, f"imgs ends after {start + len(buf) // row_bytes} of "
                                             f"{n_full} images")
                    block = np.frombuffer(buf, dtype=np.uint8).reshape(count, row_bytes)
                    if block.max() > 1:
                        raise _corrupt(path, "imgs holds values other than 0 and 1")
                    lo, hi = np.searchsorted(keep, [start, start + count])
                    packed[lo:hi] = np.packbits(block[keep[lo:hi] - start], axis=1)
    except (zipfile.BadZipFile, EOFError, zlib.error, ValueError, OSError) as err:
        raise _corrupt(path, f"{type(err).__name__}: {err}") from err
    return packed, classes[keep, 1:].astype(np.int64)


def load_dsprites(grid="full", data_dir=None):
    """Load the official npz if found, else render the procedural grid. Returns DSprites."""
    started = time.perf_counter()
    axes = grid_axes(grid)
    classes = grid_classes(grid)
    sizes = tuple(len(a) for a in axes)
    path = find_dsprites(data_dir)
    if path is not None:
        rows = None if grid == "full" else np.ravel_multi_index(classes.T, FULL_SIZES)
        packed, classes = read_official_npz(path, rows)
        md5 = file_md5(path)
        if md5 != DSPRITES_MD5:
            log.warning("%s: MD5 %s differs from the official %s; arrays look valid, using it",
                        path, md5, DSPRITES_MD5)
        source = f"official npz {path.resolve()} (md5 {md5})"
    else:
        searched = " or ".join(str(d) for d in _candidate_dirs(data_dir))
        packed = np.empty((len(classes), PACKED_BYTES), dtype=np.uint8)
        step = 16384
        for start in tqdm(range(0, len(classes), step), desc=f"rendering dSprites ({grid} grid)",
                          unit="chunk", leave=False,
                          disable=len(classes) <= step or not sys.stderr.isatty()):
            packed[start:start + step] = pack_images(render_dsprites(classes[start:start + step]))
        source = (f"procedural renderer (no {DSPRITES_FILE} in {searched}; use --download or "
                  f"--data-dir for the official file)")
    log.info("dSprites source: %s; %s grid, %d images, ready in %.1f s", source, grid,
             len(classes), time.perf_counter() - started)
    return DSprites(torch.from_numpy(packed), classes, sizes, grid, source)


def download_dsprites(dest_dir, url=DSPRITES_URL, md5=DSPRITES_MD5, timeout=10):
    """Fetch the official npz into ``dest_dir`` with a progress bar; verify MD5; write atomically.
    An existing file is kept as it is (loading validates it)."""
    dest_dir = Path(dest_dir)
    dest = dest_dir / DSPRITES_FILE
    if dest.exists():
        log.info("%s already exists: not downloading it again", dest)
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    log.info("Downloading %s to %s", url, dest)
    try:
        with atomic_file(dest) as out, urllib.request.urlopen(url, timeout=timeout) as response:
            digest = hashlib.md5()
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="dSprites",
                      disable=not sys.stderr.isatty()) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if digest.hexdigest() != md5:  # raising here keeps the file from being written
                raise DatasetError(f"download of {url} has MD5 {digest.hexdigest()}, expected "
                                   f"{md5}; nothing was saved. Try again later.")
    except (urllib.error.URLError, OSError) as err:
        raise DatasetError(f"could not download {url} ({err}). Without internet access, copy "
                           f"{DSPRITES_FILE} into {dest_dir} by hand, or train on the procedural "
                           f"dSprites (the default when no file is found).") from err
    return dest


def to_device(tensor, device):
    """``tensor`` (on the host) on ``device``. To a GPU it goes from pinned memory without
    blocking, so that a sampler's new epoch or block never makes a step wait for the host."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class EpochSampler:
    """Shuffled batches without replacement, epoch by epoch, as a DataLoader(shuffle=True).

    The order is a pure function of (seed, stream, step): resuming at any step reproduces it,
    and every batch is one slice of a permutation kept on the data's device (no per-item work).
    """

    def __init__(self, n, batch_size, seed, stream=0, device="cpu"):
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} exceeds the dataset size {n}")
        self.n, self.batch_size, self.seed, self.stream = n, batch_size, seed, stream
        self.device = device
        self.steps_per_epoch = n // batch_size
        self._epoch, self._perm = None, None

    def permutation(self, epoch):
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.stream, epoch))
        return torch.randperm(self.n, generator=generator)

    def indices(self, step):
        """Dataset indices (batch_size,) for ``step`` (0-based), on the data's device."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, to_device(self.permutation(epoch), self.device)
        return self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]


class PartnerSampler:
    """Batches drawn per item with replacement, as the original's ``np.random.randint`` picks
    the partner images (the synergy batch of --sample sample, FactorVAE's z').

    The indices of a step are a pure function of (seed, step): they are drawn a block of steps
    at a time from a generator seeded with (seed, block) and kept on the data's device, so
    resuming at any step reproduces them and no step copies anything to the device.
    """

    STREAM = 1  # keeps these draws independent of EpochSampler's (stream 0)

    def __init__(self, n, batch_size, seed, device="cpu", block=1024):
        self.n, self.batch_size, self.seed, self.device, self.block = n, batch_size, seed, device, block
        self._block_index, self._indices = None, None

    def indices(self, step):
        """Dataset indices (batch_size,) for ``step`` (0-based), on the data's device."""
        block, pos = divmod(step, self.block)
        if block != self._block_index:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, self.STREAM, block))
            draws = torch.randint(self.n, (self.block, self.batch_size), generator=generator)
            self._block_index, self._indices = block, to_device(draws, self.device)
        return self._indices[pos]


class Batches:
    """Where a step's images come from: the training batch (shuffled epochs, as a DataLoader)
    and the partner batch (drawn per item with replacement). A replay can hand the Solver any
    object with these two methods instead."""

    def __init__(self, data, batch_size, seed, device):
        self.data = data
        self.sampler = EpochSampler(len(data), batch_size, seed, 0, device)
        self.partners = PartnerSampler(len(data), batch_size, seed, device)
        self.streams = (derived_seed(seed, 11), derived_seed(seed, 12))  # a variant's draws

    def train(self, step):
        return self.data.images(self.sampler.indices(step), draw=(self.streams[0], step))

    def partner(self, step):
        return self.data.images(self.partners.indices(step), draw=(self.streams[1], step))


# --- CelebA -------------------------------------------------------------------------------------

CELEBA_ZIP = "img_align_celeba.zip"
CELEBA_FOLDER = "img_align_celeba"
CELEBA_MD5 = "00d2c5bc6d35e252742224ab0c1e8fcb"
CELEBA_SOURCE = ("https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (\"Align&Cropped Images\": "
                 "img_align_celeba.zip, 1,443,490,838 bytes, 202,599 JPEGs of 178x218, "
                 f"MD5 {CELEBA_MD5})")
# How a 178x218 photo becomes 64x64: PIL box to crop first (None: whole image), size to resize
# to with LANCZOS, then the box to crop from the resized image (None: keep all).
CELEBA_CROPS = {
    "original": (None, (64, 78), (0, 7, 64, 71)),  # the thesis: resize to 64x78, rows 7..71
    "resize": (None, (64, 64), None),  # plain resize (1Konny, YannDubs)
    "center140": ((19, 39, 159, 179), (64, 64), None),  # centre 140x140, then resize
    "center148": ((15, 35, 163, 183), (64, 64), None),  # centre 148x148, then resize
}
CACHE_VERSION = 1
# A real CelebA JPEG is ~10 KB and 178x218: anything far beyond is refused before it is read.
MAX_MEMBER_BYTES = 1 << 20
MAX_PIXELS = 1024 * 1024


def celeba_image(image, crop):
    """One PIL image -> uint8 (64, 64, 3) following CELEBA_CROPS[crop]."""
    before, size, after = CELEBA_CROPS[crop]
    image = image.convert("RGB")
    if before is not None:
        image = image.crop(before)
    image = image.resize(size, Image.LANCZOS)
    if after is not None:
        image = image.crop(after)
    return np.asarray(image, dtype=np.uint8)


class ImageArray:
    """A dataset of colour images without ground-truth factors, held as uint8 (N, 64, 64, 3):
    memory-mapped from the cache on the CPU, copied whole to a GPU."""

    has_factors = False

    def __init__(self, array, source):
        self.array = torch.from_numpy(array)  # N, 64, 64, 3 uint8
        self.source = source

    def __len__(self):
        return self.array.shape[0]

    def to(self, device):
        if torch.device(device).type != "cpu":
            self.array = self.array.to(device)
        return self

    channels = 3

    def images(self, index, draw=None):
        """Float images (B, 3, 64, 64) in [0, 1] for an index tensor on the data's device."""
        batch = self.array[index.to(self.array.device)].to(index.device)
        return batch.permute(0, 3, 1, 2).float() / 255


def _celeba_members(path):
    """Sorted JPEG names in the zip (or folder) ``path``; raises DatasetError when unusable."""
    if path.is_dir():
        names = sorted(p.name for p in path.glob("*.jpg"))
        if not names:
            raise DatasetError(f"{path} holds no .jpg files")
        return names
    if is_html_page(path):
        raise DatasetError(f"{path} is an HTML page, not a zip (a failed Google Drive download "
                           f"saves the quota page under that name). Delete it and fetch "
                           f"{CELEBA_ZIP} again from {CELEBA_SOURCE}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = sorted(n for n in archive.namelist() if n.lower().endswith(".jpg"))
    except (zipfile.BadZipFile, OSError) as err:
        raise DatasetError(f"{path} is not a readable zip ({err}); it may be truncated. Delete "
                           f"it and fetch it again from {CELEBA_SOURCE}") from err
    if not names:
        raise DatasetError(f"{path} holds no .jpg files")
    return names


def _read_celeba_chunk(path, names, crop):
    """Decode and crop a list of JPEGs from a zip or folder -> uint8 (n, 64, 64, 3)."""
    out = np.empty((len(names), 64, 64, 3), dtype=np.uint8)
    archive = None if path.is_dir() else zipfile.ZipFile(path)
    try:
        for i, name in enumerate(names):
            size = (path / name).stat().st_size if archive is None else archive.getinfo(name).file_size
            if size > MAX_MEMBER_BYTES:
                raise DatasetError(f"{path}: {name} declares {size:,} bytes, far beyond a CelebA "
                                   f"JPEG (~10 KB; limit {MAX_MEMBER_BYTES:,}); not reading it. "
                                   f"Is this the real {CELEBA_ZIP}? Fetch it from {CELEBA_SOURCE}")
            try:
                # at most the cap is read, whatever the member declares: a lying size cannot
                # inflate into memory
                with (open(path / name, "rb") if archive is None else archive.open(name)) as f:
                    data = f.read(MAX_MEMBER_BYTES + 1)
                if len(data) > MAX_MEMBER_BYTES:
                    raise DatasetError(f"{path}: {name} inflates beyond {MAX_MEMBER_BYTES:,} "
                                       f"bytes although it declares {size:,}, far beyond a "
                                       f"CelebA JPEG (~10 KB); not reading further. Is this "
                                       f"the real {CELEBA_ZIP}? Fetch it from {CELEBA_SOURCE}")
                image = Image.open(io.BytesIO(data))
                if image.width * image.height > MAX_PIXELS:
                    raise DatasetError(f"{path}: {name} is {image.width}x{image.height} pixels, "
                                       f"far beyond a CelebA photo (178x218; limit {MAX_PIXELS:,} "
                                       f"pixels); not decoding it. Fetch the real data from "
                                       f"{CELEBA_SOURCE}")
                image.load()
            except Image.DecompressionBombError as err:  # a header declaring ~200 megapixels
                raise DatasetError(f"{path}: {name} declares a size far beyond a CelebA photo "
                                   f"(178x218; {str(err).split('.')[0]}); not decoding it. Fetch "
                                   f"the real data from {CELEBA_SOURCE}") from None
            except (UnidentifiedImageError, OSError, zipfile.BadZipFile, zlib.error) as err:
                raise DatasetError(f"{path}: {name} is not a readable JPEG ({err}); the file may "
                                   f"be truncated. Fetch it again from {CELEBA_SOURCE}") from err
            out[i] = celeba_image(image, crop)
    finally:
        if archive is not None:
            archive.close()
    return out


def find_celeba(data_dir=None):
    """The CelebA zip or extracted folder in ``data_dir`` (or ./ and ./datasets), or None."""
    for folder in _candidate_dirs(data_dir):
        for candidate in (folder / CELEBA_ZIP, folder / CELEBA_FOLDER):
            if candidate.exists():
                return candidate
    return None


def celeba_cache_path(source, crop):
    """Cache file beside the data, keyed by the crop and the source's identity."""
    stat = source.stat()
    key = hashlib.sha1(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{crop}|"
                       f"{CACHE_VERSION}".encode()).hexdigest()[:10]
    return source.parent / f"celeba64_{crop}_{key}.npy"


def _decoding_worker():
    """In each preprocessing worker: Ctrl-C and SIGTERM belong to the parent, which stops the
    pool (Pool.terminate sends SIGTERM, the default action ends the worker at once); a parent
    that dies without stopping it takes the workers with it (Linux)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # fork kept it
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM wait while the block runs, then take effect. Blocking them in this
    thread is not enough: the kernel hands a process-wide signal to any thread that does not
    block it (tqdm's monitor, torch's workers), and Python then runs the handler in this thread
    wherever it is, e.g. inside the at-fork hooks of Pool's fork(), which print its
    KeyboardInterrupt and drop it (the run went on training). So during the block a signal is
    only noted, and raised again when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = (signal.SIGINT, signal.SIGTERM)
    noted = []
    previous = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in held}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)  # one pending in this thread fires here
        for s in dict.fromkeys(noted):
            signal.raise_signal(s)


def preprocess_celeba(source, cache, crop, workers=None, chunk=512):
    """Decode every JPEG once into a uint8 (N, 64, 64, 3) .npy at ``cache``, written atomically."""
    names = _celeba_members(source)
    log.info("Preprocessing %d CelebA images from %s (crop %s) into %s", len(names), source, crop,
             cache)
    chunks = [names[i:i + chunk] for i in range(0, len(names), chunk)]
    if workers is None:  # processes only pay off beyond one chunk
        workers = usable_cpus() if len(chunks) > 1 else 0
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        with disk_full_named(cache):
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                            shape=(len(names), 64, 64, 3))
            # Reserve the space now: a memory-mapped write to a full disk kills the process
            # (SIGBUS) instead of raising.
            with open(tmp, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))
        with progress(len(names), desc="CelebA preprocessing", unit="img") as bar:
            if workers:
                pool = None
                try:
                    with _signals_held():  # a signal during fork() would be swallowed
                        pool = multiprocessing.Pool(workers, initializer=_decoding_worker)
                    read = functools.partial(_read_celeba_chunk, source, crop=crop)
                    for i, block in enumerate(pool.imap(read, chunks)):
                        out[i * chunk:i * chunk + len(block)] = block
                        bar.update(len(block))
                    pool.close()
                except BaseException:  # Ctrl-C, SIGTERM, a bad image: stop the workers now
                    if pool is not None:
                        with _signals_held():  # a second SIGTERM cannot cut it short
                            pool.terminate()
                            pool.join()
                    raise
                pool.join()
            else:
                for i, names_i in enumerate(chunks):
                    out[i * chunk:i * chunk + len(names_i)] = _read_celeba_chunk(source, names_i, crop)
                    bar.update(len(names_i))
        out.flush()
        del out
        os.replace(tmp, cache)
    finally:
        if tmp.exists():
            tmp.unlink()


def celeba_source(data_dir=None):
    """The CelebA zip or folder ``find_celeba`` finds, or DatasetError naming where it looked."""
    source = find_celeba(data_dir)
    if source is None:
        searched = " or ".join(str(d) for d in _candidate_dirs(data_dir))
        raise DatasetError(f"no CelebA in {searched}: expected {CELEBA_ZIP} or an extracted "
                           f"{CELEBA_FOLDER}/ folder (use --data-dir). Get it from {CELEBA_SOURCE}")
    return source


def check_data(dataset, data_dir, scream_image=None):
    """What a run checks of its data before it writes anything (also ``--dry-run`` and
    study.py's trial check): --data-dir is a folder, CelebA is there, the Scream painting is
    readable. dSprites always is (the official npz, else the procedural one)."""
    check_data_dir(data_dir)
    if dataset == "celeba":
        celeba_source(data_dir)
    if dataset == "scream_dsprites":
        load_scream(scream_image)
    elif scream_image is not None:
        raise DatasetError(f"--scream-image is for --dataset scream_dsprites, not {dataset}")


def load_celeba(data_dir=None, crop="original"):
    """CelebA as an ImageArray, preprocessing into the cache on first use."""
    if crop not in CELEBA_CROPS:
        raise ValueError(f"unknown CelebA crop {crop!r}; choose from {tuple(CELEBA_CROPS)}")
    source = celeba_source(data_dir)
    started = time.perf_counter()
    cache = celeba_cache_path(source, crop)
    if not cache.exists():
        preprocess_celeba(source, cache, crop)
    try:
        array = np.load(cache, mmap_mode="c")  # copy-on-write: writable view, nothing written
    except (ValueError, OSError) as err:
        raise DatasetError(f"cache {cache} is unreadable ({err}); delete it to rebuild it") from err
    if array.ndim != 4 or array.shape[1:] != (64, 64, 3) or array.dtype != np.uint8:
        raise DatasetError(f"cache {cache} holds {array.dtype} {array.shape}, not uint8 "
                           f"(N, 64, 64, 3); delete it to rebuild it")
    source_text = f"CelebA {source.resolve()} ({len(array)} images, crop {crop}, cache {cache.name})"
    log.info("CelebA source: %s; ready in %.1f s", source_text, time.perf_counter() - started)
    return ImageArray(array, source_text)


FACTOR_DATASETS = ("dsprites", *DSPRITES_VARIANTS)  # with ground-truth factors: scored, plotted
DATASETS = (*FACTOR_DATASETS, "celeba")


def load_dataset(name, data_dir=None, grid="full", celeba_crop="original", scream_image=None):
    """The training data of ``--dataset``: DSprites, a DSpritesVariant, or an ImageArray
    (CelebA)."""
    if name == "dsprites":
        return load_dsprites(grid, data_dir)
    if name in DSPRITES_VARIANTS:
        return load_variant(name, grid, data_dir, scream_image)
    if name == "celeba":
        return load_celeba(data_dir, celeba_crop)
    raise ValueError(f"unknown dataset {name!r}")
