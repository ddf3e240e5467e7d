"""Renderer against real dSprites frames, grid order, packing, sampling, npz validation, download."""
import hashlib
import http.server
import threading
import time

import numpy as np
import pytest
import torch

import dataset
from conftest import FIXTURES
from dataset import (DatasetError, EpochSampler, PartnerSampler, download_dsprites, grid_classes,
                     latents_values, load_dsprites, pack_images, render_dsprites, unpack_images)


def test_renderer_reproduces_real_frames():
    fixture = np.load(FIXTURES / "dsprites_gif_frames.npz")
    images = render_dsprites(fixture["latents_classes"])
    assert images.dtype == np.uint8 and images.shape == (320, 64, 64)
    wrong = (images != fixture["imgs"]).reshape(320, -1).sum(1)
    assert (wrong == 0).sum() >= 240
    assert wrong.sum() <= 150


def test_renderer_geometry_anchors():
    # index 0: square, scale 0.5, orientation 0, position (0, 0): rows and cols 11..20 set
    image = render_dsprites([[0, 0, 0, 0, 0]])[0]
    assert image.sum() == 100 and image[11:21, 11:21].all()
    areas = render_dsprites([[s, k, 0, 0, 0] for s in range(3) for k in range(6)]).sum((1, 2))
    official = np.array([100, 144, 196, 256, 324, 400, 76, 104, 144, 184, 228, 288,
                         58, 84, 108, 140, 182, 222])
    assert np.array_equal(areas[:12], official[:12])  # square and ellipse: exact
    assert np.abs(areas[12:] - official[12:]).max() <= 2  # heart: best identification
    with pytest.raises(ValueError, match="out of range"):
        render_dsprites([[3, 0, 0, 0, 0]])


def test_grid_order_and_values_match_the_official_layout():
    classes = grid_classes("full")
    assert classes.shape == (737280, 5)
    index = np.array([0, 1, 31, 32, 1024, 40960, 245759, 737279])
    assert np.array_equal(classes[index], np.stack(np.unravel_index(index, (3, 6, 40, 32, 32)), 1))
    values = latents_values(classes[[0, 737279]])
    assert values[0].tolist() == [1, 1, 0.5, 0, 0, 0]
    assert np.allclose(values[1], [1, 3, 1, 2 * np.pi, 1, 1])
    reduced = grid_classes("reduced")
    assert reduced.shape == (11520, 5)
    flat = np.ravel_multi_index(reduced.T, (3, 6, 40, 32, 32))
    assert np.all(np.diff(flat) > 0)  # a subset of the full grid, in the same order
    assert set(reduced[:, 2]) == set(range(0, 40, 4)) and {0, 31} <= set(reduced[:, 3])


def test_pack_unpack_roundtrip():
    images = render_dsprites(grid_classes("reduced")[::997])
    packed = torch.from_numpy(pack_images(images))
    assert packed.shape == (len(images), 512) and packed.dtype == torch.uint8
    assert np.array_equal(unpack_images(packed)[:, 0].numpy().astype(np.uint8), images)


def test_procedural_dataset_matches_renderer(tmp_path):
    data = load_dsprites("reduced", data_dir=tmp_path)
    assert len(data) == 11520 and data.factor_sizes == (3, 6, 10, 8, 8)
    assert "procedural" in data.source
    index = torch.tensor([0, 5000, 11519])
    expected = render_dsprites(data.classes[index.numpy()])
    assert np.array_equal(data.images(index)[:, 0].numpy().astype(np.uint8), expected)


def test_epoch_sampler_is_a_pure_function_of_the_step():
    a = EpochSampler(100, 8, seed=3)
    epoch = torch.cat([a.indices(s) for s in range(12)])
    assert len(set(epoch.tolist())) == 96  # without replacement within an epoch
    b = EpochSampler(100, 8, seed=3)
    assert torch.equal(b.indices(13), a.indices(13)) and torch.equal(b.indices(5), epoch[40:48])
    assert not torch.equal(a.indices(0), a.indices(12))  # a new permutation each epoch
    assert not torch.equal(EpochSampler(100, 8, seed=3, stream=1).indices(0), a.indices(0))


# --- the official npz, on a small stand-in grid -------------------------------------------------

SMALL = (3, 6, 2, 4, 4)


@pytest.fixture
def small_grid(monkeypatch):
    monkeypatch.setattr(dataset, "FULL_SIZES", SMALL)
    return SMALL


def write_npz(path, imgs, classes):
    full = np.concatenate([np.zeros((len(classes), 1), np.int64), classes], axis=1)
    np.savez_compressed(path, imgs=imgs, latents_classes=full, latents_values=latents_values(classes))


def test_official_npz_is_used_when_present(tmp_path, small_grid):
    classes = grid_classes("full")
    imgs = render_dsprites(classes)
    imgs[0, 0, 0] = 1  # mark the file so that the test can tell it from a render
    write_npz(tmp_path / dataset.DSPRITES_FILE, imgs, classes)
    data = load_dsprites("full", data_dir=tmp_path)
    assert data.source.startswith("official npz") and len(data) == len(classes)
    assert np.array_equal(data.images(torch.arange(len(classes)))[:, 0].numpy().astype(np.uint8), imgs)


@pytest.mark.parametrize("damage, message", [
    ("garbage", "BadZipFile"),
    ("html", "is an HTML page, not the dSprites npz"),
    ("truncated", "not a valid dSprites file"),
    ("missing", "missing arrays"),
    ("values", "other than 0 and 1"),
    ("order", "official order"),
    ("shape", "imgs has shape"),
])
def test_corrupt_npz_gives_a_clear_error(tmp_path, small_grid, damage, message):
    path = tmp_path / dataset.DSPRITES_FILE
    classes = grid_classes("full")
    imgs = render_dsprites(classes)
    if damage == "garbage":
        path.write_bytes(b"PK\x03\x04 not a zip at all")
    elif damage == "html":  # what a failed download saves under the npz's name
        path.write_bytes(b"\n  <!DOCTYPE html><html><body>Sign in</body></html>")
    elif damage == "missing":
        np.savez_compressed(path, imgs=imgs)
    else:
        if damage == "values":
            imgs = imgs * 255
        if damage == "order":
            classes = classes[::-1].copy()
        if damage == "shape":
            imgs = imgs[:, :32]
        write_npz(path, imgs, classes)
        if damage == "truncated":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetError, match=message) as info:
        load_dsprites("full", data_dir=tmp_path)
    assert "--download" in str(info.value)


# --- download -----------------------------------------------------------------------------------

@pytest.fixture
def http_file():
    payload = b"not really dSprites, but bytes to fetch" * 1000

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/file.npz", payload
    server.shutdown()


@pytest.mark.slow
def test_download_verifies_md5_and_writes_atomically(tmp_path, http_file):
    url, payload = http_file
    with pytest.raises(DatasetError, match="MD5"):
        download_dsprites(tmp_path, url=url, md5="0" * 32)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
    path = download_dsprites(tmp_path, url=url, md5=hashlib.md5(payload).hexdigest())
    assert path.read_bytes() == payload and path.name == dataset.DSPRITES_FILE
    path.write_bytes(b"kept")  # an existing file is never downloaded over
    assert download_dsprites(tmp_path, url=url, md5=hashlib.md5(payload).hexdigest()) == path
    assert path.read_bytes() == b"kept"


def test_download_offline_fails_fast_with_a_clear_message(tmp_path):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(DatasetError, match="could not download .* by hand"):
        download_dsprites(tmp_path, url=f"http://127.0.0.1:{port}/x.npz")
    assert time.monotonic() - start < 5
    assert list(tmp_path.iterdir()) == []


def test_partner_batches_are_drawn_with_replacement_as_a_pure_function_of_seed_and_step():
    a = PartnerSampler(50, 40, seed=3, block=4)
    draws = [a.indices(s).clone() for s in range(10)]
    b = PartnerSampler(50, 40, seed=3, block=4)
    assert torch.equal(b.indices(9), draws[9]) and torch.equal(b.indices(2), draws[2])
    assert any(len(set(d.tolist())) < 40 for d in draws)  # with replacement: repeats occur
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[3], draws[4])
    assert not torch.equal(PartnerSampler(50, 40, seed=4, block=4).indices(0), draws[0])
