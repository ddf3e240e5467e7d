"""disentanglement_lib's dSprites variants (--dataset color_dsprites, noisy_dsprites,
scream_dsprites): image statistics against the definitions, randomness that is a pure function
of the draw, a short run on each with its figures and final evaluation, resume exact, bad input."""
import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from conftest import records, run_cli
from dataset import (DSPRITES_VARIANTS, FACTOR_DATASETS, Batches, counter_uniform, load_dataset,
                     unpack_images)
from model import MODEL_SPECS
from run import main

N = 256


@pytest.fixture(scope="module")
def plain():
    return load_dataset("dsprites", grid="reduced")


def scream_file(path, pixels):
    Image.fromarray(pixels).save(path)  # PNG: exact pixels (within 350x274: no thumbnailing)
    return path


def some(data, n=N, offset=0):
    index = torch.arange(offset, offset + n * 37, 37)  # spread over the grid
    return index, data.images(index)


def test_every_factor_dataset_has_a_network_and_the_variants_three_channels(plain):
    assert set(MODEL_SPECS) == set(dataset.DATASETS)
    assert all(MODEL_SPECS[name].nc == 3 for name in DSPRITES_VARIANTS)
    assert MODEL_SPECS["color_dsprites"].reconstruction_loss is MODEL_SPECS["dsprites"] \
        .reconstruction_loss  # Bernoulli, as disentanglement_lib trains them
    assert set(DSPRITES_VARIANTS) < set(FACTOR_DATASETS)


def test_color_sprites_take_one_colour_in_half_to_one_on_black(plain):
    data = load_dataset("color_dsprites", grid="reduced")
    index, x = some(data)
    sprite = unpack_images(plain.packed[index]).bool().expand(-1, 3, -1, -1)
    assert x.shape == (N, 3, 64, 64) and x.dtype == torch.float32
    assert torch.all(x[~sprite] == 0)  # the background stays black
    on = x.masked_fill(~sprite, float("nan")).flatten(2)  # sprite pixels only
    colour = on.nanmean(2)  # B, 3
    assert torch.allclose(on.nan_to_num(-1).amax(2), colour)  # one colour per image and channel
    assert torch.allclose(on.nan_to_num(2).amin(2), colour)
    assert colour.min() >= 0.5 and colour.max() <= 1
    assert colour.min() < 0.52 and colour.max() > 0.98  # the range is covered
    assert colour.std(0).min() > 0.12  # uniform on [0.5, 1]: std 0.144 per channel
    assert (colour[:, 0] - colour[:, 1]).abs().mean() > 0.1  # channels drawn independently


def test_noisy_sprites_stay_white_on_uniform_noise(plain):
    data = load_dataset("noisy_dsprites", grid="reduced")
    index, x = some(data)
    sprite = unpack_images(plain.packed[index]).bool().expand(-1, 3, -1, -1)
    assert torch.all(x[sprite] == 1)
    noise = x[~sprite]
    assert noise.min() >= 0 and noise.max() < 1
    assert abs(noise.mean().item() - 0.5) < 0.005 and abs(noise.std().item() - 12 ** -0.5) < 0.005
    assert not torch.equal(x[:, 0], x[:, 1])  # per channel


def test_scream_backgrounds_are_crops_averaged_with_a_colour_and_the_sprite_inverted(
        plain, tmp_path):
    black = scream_file(tmp_path / "black.png", np.zeros((200, 300, 3), np.uint8))
    data = load_dataset("scream_dsprites", grid="reduced", scream_image=black)
    index, x = some(data)
    sprite = unpack_images(plain.packed[index]).bool().expand(-1, 3, -1, -1)
    background = x.masked_fill(sprite, float("nan")).flatten(2).nanmean(2)  # colour / 2
    assert torch.allclose(x.masked_fill(sprite, 0).flatten(2).amax(2), background)
    assert background.min() >= 0 and background.max() <= 0.5
    assert background.min() < 0.02 and background.max() > 0.48  # colour uniform on [0, 1]^3
    inverted = x.masked_fill(~sprite, float("nan")).flatten(2).nanmean(2)
    assert torch.allclose(inverted, 1 - background)  # the sprite's pixels: 1 - background
    # a ramp painting: each image is a 64-pixel window of it, at its own random offset
    ramp = np.zeros((200, 300, 3), np.uint8)
    ramp[:, :, 0] = np.arange(300) * 255 // 299
    data = load_dataset("scream_dsprites", grid="reduced", scream_image=scream_file(
        tmp_path / "ramp.png", ramp))
    index, x = some(data)
    sprite = unpack_images(plain.packed[index]).bool()[:, 0]
    row = torch.where(sprite, float("nan"), x[:, 0]).nanmean(1)  # B, 64: (ramp + colour) / 2
    steps = (row[:, 1:] - row[:, :-1]).nan_to_num(0) * 2 * 255
    assert steps.max() <= 2.01 and steps.min() >= -0.01  # consecutive columns of the ramp
    first = ((row[:, 0] * 2) * 255)  # ramp[left] + 255 * colour: differs between images
    assert first.std() > 20


def test_an_images_randomness_is_the_same_in_any_batch_and_new_in_each_training_draw(tmp_path):
    for name in DSPRITES_VARIANTS:
        data = load_dataset(name, grid="reduced", scream_image=scream_file(
            tmp_path / "s.png", np.random.default_rng(0).integers(0, 255, (200, 300, 3),
                                                                  dtype=np.uint8)))
        index = torch.tensor([5, 700, 9000])
        alone = torch.cat([data.images(index[i:i + 1]) for i in range(3)])
        assert torch.equal(data.images(index), alone), name  # evaluation: keyed by index
        batches = Batches(data, 16, seed=3, device="cpu")
        first, again = batches.train(4), Batches(data, 16, seed=3, device="cpu").train(4)
        assert torch.equal(first, again), name  # a pure function of (seed, step): resume exact
        same_images = data.images(batches.sampler.indices(4), draw=(batches.streams[0], 5))
        assert not torch.equal(first, same_images), name  # another step, other randomness
        other_seed = Batches(data, 16, seed=4, device="cpu")
        assert not torch.equal(data.images(index, draw=(batches.streams[0], 0)),
                               data.images(index, draw=(other_seed.streams[0], 0))), name


def test_the_hash_wraps_as_unsigned_32_bit_arithmetic():
    def reference(x):  # numpy's uint32: products wrap modulo 2**32, shifts are logical
        for _ in range(2):
            x = (x ^ (x >> np.uint32(16))) * np.uint32(0x45D9F3B)
        return x ^ (x >> np.uint32(16))
    values = np.random.default_rng(0).integers(0, 2 ** 32, 100_000, dtype=np.uint64)
    values = np.concatenate([values, [0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1]]).astype(np.uint32)
    hashed = dataset._hash32(torch.from_numpy(values.view(np.int32))).numpy().view(np.uint32)
    assert np.array_equal(hashed, reference(values))


def test_counter_uniform_is_uniform_and_keyed():
    u = counter_uniform(7, torch.arange(1000), 100)
    assert u.shape == (1000, 100) and u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert torch.equal(u[10:20], counter_uniform(7, torch.arange(10, 20), 100))
    assert not torch.equal(u, counter_uniform(8, torch.arange(1000), 100))
    big = torch.tensor([2 ** 40, 2 ** 40 + 1])  # keys beyond 32 bits stay distinct
    v = counter_uniform(7, big, 4)
    assert not torch.equal(v[0], v[1])
    corr = np.corrcoef(u[:, 0].numpy(), u[:, 1].numpy())[0, 1]
    assert abs(corr) < 0.1


@pytest.mark.parametrize("name", ["color_dsprites",  # one in the quick tier, two in the slow one
                                  pytest.param("noisy_dsprites", marks=pytest.mark.slow),
                                  pytest.param("scream_dsprites", marks=pytest.mark.slow)])
def test_a_short_run_on_each_variant_writes_its_figures_and_final_evaluation(tmp_path, name):
    painting = scream_file(tmp_path / "scream.png", np.random.default_rng(1).integers(
        0, 255, (274, 350, 3), dtype=np.uint8))
    extra = ["--scream-image", str(painting)] if name == "scream_dsprites" else []
    code, run_dir = run_cli(tmp_path, name, "--dataset", name, *extra, "--steps", "2",
                            "--save-interval", "2", "--gt-interval", "2", "--eval-metrics",
                            "factor_vae,mig")
    assert code == 0
    traversal = Image.open(run_dir / "alpha_1.5_traversal_2.png")
    assert traversal.mode == "RGB"
    pixels = np.asarray(traversal)
    assert (pixels[..., 0] != pixels[..., 1]).any()  # coloured, not grey
    assert (run_dir / "alpha_1.5_gt_2.png").is_file()
    final = json.loads((run_dir / "metrics.json").read_text())["evaluations"][-1]
    assert set(final["scores"]) == {"factor_vae", "mig"}
    assert all(np.isfinite(final["scores"][m]["score"]) for m in final["scores"])
    metadata = json.loads((run_dir / "config.json").read_text())
    assert metadata["config"]["dataset"] == name and name in metadata["data_source"]
    if name == "scream_dsprites":
        assert "scream.png (md5 " in metadata["data_source"]
    assert [r["step"] for r in records(run_dir)] == [2]


@pytest.mark.slow
def test_an_interrupted_variant_run_resumes_to_the_same_weights(tmp_path, at_step, monkeypatch):
    flags = ["--dataset", "noisy_dsprites", "--metric", "Factor", "--steps", "6",
             "--save-interval", "2", "--seed", "5"]
    assert run_cli(tmp_path, "straight", *flags)[0] == 0
    at_step(3, lambda solver: os.kill(os.getpid(), signal.SIGTERM))
    code, run_dir = run_cli(tmp_path, "resumed", *flags)
    assert code == 130
    monkeypatch.undo()
    assert main(["--resume", str(run_dir)]) == 0
    load = lambda d: torch.load(d / "checkpoints/last.pt", weights_only=True)["model"]  # noqa: E731
    straight, resumed = load(tmp_path / "straight"), load(run_dir)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_scream_without_its_painting_or_with_another_dataset_is_one_line(tmp_path, capsys):
    for flags, message in (
            (["--dataset", "scream_dsprites"], "needs --scream-image PATH: the Scream painting "
                                               "is not shipped"),
            (["--dataset", "scream_dsprites", "--scream-image", str(tmp_path / "none.jpg")],
             "no such file"),
            (["--dataset", "color_dsprites", "--scream-image", str(tmp_path / "none.jpg")],
             "--scream-image is for --dataset scream_dsprites"),
            (["--dataset", "scream_dsprites", "--scream-image", str(scream_file(
                tmp_path / "small.png", np.zeros((50, 300, 3), np.uint8)))],
             "its crops need more than 64 pixels")):
        code, run_dir = run_cli(tmp_path, "r", *flags)
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert not run_dir.exists()


def test_any_encoder_is_scored_on_a_variant_with_its_three_channels():
    from representation import score
    shapes = []

    def encode(x):
        shapes.append(tuple(x.shape[1:]))
        m = (x > 0).float().mean(1)  # the sprite's mask from the colour
        mass = m.sum((1, 2)).clamp_min(1e-6)
        xs = torch.arange(64.0)
        return torch.stack([(m * xs).sum((1, 2)) / mass, (m * xs[:, None]).sum((1, 2)) / mass,
                            mass.sqrt()], 1)
    result = score(encode, dataset="color_dsprites", grid="reduced", metrics=["mig"])
    assert set(shapes) == {(3, 64, 64)} and result["mig"]["score"] > 0.4


@pytest.mark.slow  # three runs and the thesis figures
def test_the_thesis_figures_of_variant_runs_keep_their_colours(tmp_path):
    import figures
    painting = scream_file(tmp_path / "scream.png", np.random.default_rng(1).integers(
        0, 255, (274, 350, 3), dtype=np.uint8))
    runs = {}
    for name, metric in zip(DSPRITES_VARIANTS, ("Test_gt", "Factor", "VAE"), strict=True):
        code, runs[name] = run_cli(tmp_path, name, "--dataset", name, "--metric", metric,
                                   "--scream-image" if name == "scream_dsprites" else "--seed",
                                   str(painting) if name == "scream_dsprites" else "120",
                                   "--steps", "2", "--save-interval", "2", "--gt-interval", "2")
        assert code == 0
    out = tmp_path / "figs"
    assert figures.main(["--nonsyn", str(runs["color_dsprites"]), "--factor",
                         str(runs["noisy_dsprites"]), "--vae", str(runs["scream_dsprites"]),
                         "--out", str(out)]) == 0
    for figure in ("latents.png", "VAE_traversals.png", "traversal_labelled.png"):
        pixels = np.asarray(Image.open(out / figure).convert("RGB")).astype(int)
        assert (np.abs(pixels[..., 0] - pixels[..., 1]) > 40).any(), figure  # colour kept
