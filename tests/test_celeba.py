"""CelebA on a small synthetic img_align_celeba.zip: geometry of every crop, the cache, bad
input, and a short training run."""
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

import dataset
from conftest import write_celeba_zip
from dataset import CELEBA_ZIP, DatasetError, load_celeba, preprocess_celeba
from run import main

N_IMAGES = 24


@pytest.fixture
def celeba_zip(tmp_path):
    return write_celeba_zip(tmp_path / CELEBA_ZIP, N_IMAGES)


# crop -> (a row inside the white band, a row outside it, a column inside the red band,
#          a column outside it, whether the green top band survives)
GEOMETRY = {
    "original": (36, 20, 18, 30, False),  # rows *78/218 - 7: band 28.8..43.1; cols *64/178
    "resize": (35, 20, 18, 30, True),  # rows *64/218: band 29.4..41.1
    "center140": (37, 20, 12, 30, False),  # (r-39)*64/140: band 27.9..46.2; cols 9.6..18.7
    "center148": (36, 20, 15, 30, False),  # (r-35)*64/148: band 28.1..45.4; cols 10.8..19.5
}


@pytest.mark.parametrize("crop", list(GEOMETRY))
def test_crop_geometry(celeba_zip, crop):
    data = load_celeba(celeba_zip.parent, crop)
    assert len(data) == N_IMAGES
    images = data.array.numpy()  # N, 64, 64, 3
    row_in, row_out, col_in, col_out, green_kept = GEOMETRY[crop]
    image = images[0].astype(int)
    assert image[row_in, col_out].min() > 200  # white band
    assert image[row_out, col_out].max() < 60
    assert image[row_out, col_in, 0] > 200 and image[row_out, col_in, 1:].max() < 60  # red band
    assert (image[0, 30, 1] > 200) == green_kept
    assert data.images(dataset.torch.tensor([0, 3])).shape == (2, 3, 64, 64)


def test_cache_is_reused_and_keyed_by_crop(celeba_zip, monkeypatch):
    first = load_celeba(celeba_zip.parent, "original")
    caches = sorted(p.name for p in celeba_zip.parent.glob("celeba64_*.npy"))
    assert len(caches) == 1 and "original" in caches[0]

    def no_preprocessing(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(dataset, "preprocess_celeba", no_preprocessing)
    again = load_celeba(celeba_zip.parent, "original")
    assert np.array_equal(first.array.numpy(), again.array.numpy())
    monkeypatch.undo()
    load_celeba(celeba_zip.parent, "resize")
    assert len(list(celeba_zip.parent.glob("celeba64_*.npy"))) == 2


def test_parallel_preprocessing_and_extracted_folder_match(celeba_zip, tmp_path):
    serial = load_celeba(celeba_zip.parent).array.numpy()
    parallel_cache = tmp_path / "parallel.npy"
    preprocess_celeba(celeba_zip, parallel_cache, "original", workers=2, chunk=5)
    assert np.array_equal(np.load(parallel_cache), serial)
    folder = tmp_path / "extracted"
    with zipfile.ZipFile(celeba_zip) as archive:
        archive.extractall(folder)
    assert np.array_equal(load_celeba(folder).array.numpy(), serial)


def no_cache_left(folder):
    return not list(folder.glob("celeba64_*")) and not list(folder.glob(".celeba64_*"))


def test_missing_celeba_names_the_files_and_the_source(tmp_path):
    with pytest.raises(DatasetError, match="expected img_align_celeba.zip or an extracted "
                                           "img_align_celeba/ folder.*mmlab"):
        load_celeba(tmp_path)


def test_html_instead_of_zip(tmp_path):
    (tmp_path / CELEBA_ZIP).write_text("<!DOCTYPE html><html><body>Google Drive - quota "
                                       "exceeded</body></html>")
    with pytest.raises(DatasetError, match="img_align_celeba.zip is an HTML page"):
        load_celeba(tmp_path)
    assert no_cache_left(tmp_path)


def test_truncated_zip(celeba_zip):
    celeba_zip.write_bytes(celeba_zip.read_bytes()[: celeba_zip.stat().st_size // 2])
    with pytest.raises(DatasetError, match="img_align_celeba.zip"):
        load_celeba(celeba_zip.parent)
    assert no_cache_left(celeba_zip.parent)


def test_unreadable_jpeg_is_named(tmp_path):
    write_celeba_zip(tmp_path / CELEBA_ZIP, 5, broken={4})
    with pytest.raises(DatasetError, match="000004.jpg is not a readable JPEG"):
        load_celeba(tmp_path)
    assert no_cache_left(tmp_path)


def test_celeba_training_run(celeba_zip, tmp_path, capsys):
    code = main(["--dataset", "celeba", "--data-dir", str(celeba_zip.parent), "--steps", "4",
                 "--batch_size", "8", "--log-interval", "2", "--save-interval", "4",
                 "--gt-interval", "2", "--nb-test", "5", "--no-cuda", "--alpha", "5.0",
                 "--output_dir", str(tmp_path / "runs"), "--run-name", "faces"])
    assert code == 0
    run_dir = tmp_path / "runs" / "faces"
    grid = Image.open(run_dir / "alpha_5.0_traversal_4.png")
    assert grid.mode == "RGB" and grid.size == (5 * 66 + 2, 12 * 66 + 2)
    assert not list(run_dir.glob("*_gt_*.png"))  # no ground-truth factors, no plot
    metadata = json.loads((run_dir / "config.json").read_text())
    assert metadata["n_images"] == N_IMAGES and metadata["data_source"].startswith("CelebA")
    assert metadata["config"]["celeba_crop"] == "original" and metadata["factors"] is None
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (celeba_zip.parent / dataset.DSPRITES_FILE).exists()


def test_download_is_not_offered_for_celeba(tmp_path, capsys):
    assert main(["--dataset", "celeba", "--download", "--output_dir", str(tmp_path)]) == 2
    assert "only offered for dSprites" in capsys.readouterr().err
