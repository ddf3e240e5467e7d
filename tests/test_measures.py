"""Measures that studies compare: i_max (alpha-free, one omega for every objective), the final
evaluation's fixed-sample recon / KL / ELBO / i_max, and how summaries print them."""
import math

import numpy as np
import pytest
import torch

import study
from model import bernoulli_loss
from config import default_run_name
from config import Config, objective_label
from representation import Trained, sample_measures
from solver import Solver
from synergy import kl_per_latent


def greedy_worst_kl(k, omega):
    """The original's greedy scan in plain Python (README, "How it works"): KL of the worst set."""
    best, record = [], 0.0
    for _ in range(len(k)):
        chosen = list(best)
        for j in range(len(k)):
            if j in best:
                continue
            v = sum(k[i] for i in best + [j])
            if (v > record) if not best else (omega * v > record):
                chosen, record = best + [j], v
        best = chosen
    return sum(k[j] for j in range(len(k)) if j not in best)


def first_values(tmp_path, **settings):
    config = Config(**{**dict(grid="reduced", batch_size=16, cuda=False, seed=3,
                              eval_metrics=""), **settings})
    solver = Solver(config, tmp_path / config.metric)
    x = solver.batches.train(0)
    with torch.no_grad():
        mu, logvar = solver.model.encoder(x)  # the posterior at θ_0, before the step changes it
    values, _ = solver.advance()
    return values, kl_per_latent(mu, logvar).mean(0).tolist()


@pytest.mark.parametrize("omega", [0.9, 0.5])
def test_i_max_is_the_same_measure_for_every_objective_and_alpha_free(tmp_path, omega):
    runs = [dict(metric="Test_gt", alpha=5.0, omega=0.9), dict(metric="Test_gt", alpha=0.5,
            omega=0.6, update="joint"), dict(metric="Test_gt", alpha=2.0, sample="sample"),
            dict(metric="VAE"), dict(metric="BVAE", beta=4.0), dict(metric="Factor", gamma=6.4)]
    measured = []
    for i, settings in enumerate(runs):
        values, kl = first_values(tmp_path / str(i), measure_omega=omega, **settings)
        assert values["i_max"].item() == pytest.approx(greedy_worst_kl(kl, omega), rel=1e-5)
        measured.append(values["i_max"].item())
        if settings["metric"] == "Test_gt" and settings.get("omega") == omega == 0.9:
            assert values["syn"].item() == pytest.approx(settings["alpha"] * measured[-1])
    assert measured == pytest.approx([measured[0]] * len(runs), rel=1e-5)
    assert measured[0] > 0


def test_sample_measures_match_an_image_by_image_recomputation(tmp_path):
    config = Config(grid="reduced", cuda=False, seed=4, eval_sample=37, measure_omega=0.8)
    trained = Trained.build(config)
    measures = sample_measures(trained.model, trained.data, config, batch_size=16)
    # Independently: the same 37 images and noise, one image at a time, plain formulas.
    generator = torch.Generator().manual_seed(0)
    index = torch.randperm(len(trained.data), generator=generator)[:37]
    noise = torch.randn(37, config.z_dim, generator=generator)
    recon, kl = [], []
    trained.model.eval()
    with torch.no_grad():
        for i, n in zip(index.tolist(), noise, strict=True):
            x = trained.data.images(torch.tensor([i]))
            mu, logvar = trained.model.encoder(x)
            z = mu + n * torch.exp(0.5 * logvar)
            recon.append(bernoulli_loss(trained.model.decoder(z), x).item())
            kl.append((0.5 * (mu ** 2 + logvar.exp() - logvar - 1)).double().numpy()[0])
    kl_mean = np.mean(kl, axis=0)
    assert measures["n_images"] == 37 and measures["measure_omega"] == 0.8
    assert measures["recon"] == pytest.approx(np.mean(recon), rel=1e-5)
    assert measures["kl"] == pytest.approx(kl_mean.sum(), rel=1e-5)
    assert measures["elbo"] == pytest.approx(-(np.mean(recon) + kl_mean.sum()), rel=1e-5)
    assert measures["i_max"] == pytest.approx(greedy_worst_kl(kl_mean.tolist(), 0.8), rel=1e-5)
    # the same sample for a differently trained model of the same data: only the model differs
    again = sample_measures(trained.model, trained.data, config, batch_size=500)
    assert again["recon"] == pytest.approx(measures["recon"], rel=1e-6)


def test_the_final_evaluation_records_the_sample_measures(tmp_path):
    from conftest import no_data
    from run import main
    from runfolder import RunFolder
    assert main(["--grid", "reduced", "--batch_size", "8", "--steps", "4", "--log-interval", "2",
                 "--save-interval", "4", "--gt-interval", "1000", "--no-cuda", "--nb-test", "2",
                 "--eval-metrics", "none", "--eval-sample", "50", "--metric", "VAE",
                 "--output_dir", str(tmp_path), "--run-name", "r",
                 "--data-dir", str(no_data(tmp_path))]) == 0
    (report,) = RunFolder(tmp_path / "r").evaluations()
    assert report["step"] == 4 and report["scores"] == {}
    assert set(report["measures"]) >= {"recon", "kl", "elbo", "i_max", "n_images", "protocol"}
    assert report["measures"]["n_images"] == 50


@pytest.mark.parametrize("mean, std, text", [
    (427.4, 102.3, "427 ± 102"), (14.86, 1.41, "14.9 ± 1.4"), (0.5934, 0.12, "0.59 ± 0.12"),
    (0.2164, 0.052, "0.216 ± 0.052"), (97.16, 3.7, "97.2 ± 3.7"), (3.14159, 0.0, "3.142"),
    (1508.69, 10.0, "1509 ± 10"),
])
def test_summary_numbers_are_printed_to_the_precision_their_spread_allows(mean, std, text):
    assert study.mean_std_text(mean, std) == text


def test_objectives_are_named_as_a_reader_names_them():
    assert objective_label(dict(metric="Test_gt", alpha=5.0, omega=0.9)) == \
        "Non-Syn VAE (alpha 5, omega 0.9)"
    assert objective_label(dict(metric="Factor", gamma=6.4, alpha=1.5)) == "FactorVAE (gamma 6.4)"
    assert objective_label(dict(metric="BVAE_gt", beta=4.0)) == "beta-VAE (beta 4)"
    assert objective_label(dict(metric="VAE", alpha=7.0, precision="bf16")) == "VAE (bf16)"
    assert objective_label(dict(metric="test", update="joint")) == \
        "Non-Syn VAE (alpha 1.5, omega 0.8, update joint)"
    assert study.measure_label("factor_vae") == "FactorVAE score"
    assert study.measure_label("i_max@0.5") == "I_max (omega 0.5)"


def test_run_folder_names_carry_only_the_settings_of_their_objective():
    names = {metric: default_run_name(Config(metric=metric, seed=2))
             for metric in ("Test_gt", "VAE", "Factor", "BVAE")}
    assert names["Test_gt"].startswith("Test_gt_alpha1.5_omega0.8_seed2_")
    assert names["VAE"].startswith("VAE_seed2_") and "alpha" not in names["VAE"]
    assert names["Factor"].startswith("Factor_gamma6.4_seed2_")
    assert names["BVAE"].startswith("BVAE_beta4.0_seed2_")
    assert default_run_name(Config(metric="VAE", precision="bf16")).startswith("VAE_bf16_seed120")


def test_a_summary_never_mixes_sample_measures_with_minibatch_losses(tmp_path):
    """A run evaluated before the sample measures existed contributes its scores only."""
    import json
    from runfolder import RunFolder
    from utils import write_json
    for name, measures in (("new", dict(recon=1.0, kl=2.0, elbo=-3.0, i_max=0.5,
                                        measure_omega=0.9)), ("old", None)):
        folder = tmp_path / name
        folder.mkdir()
        write_json(folder / RunFolder.REPORT, {"evaluations": [dict(
            step=4, scores={"mig": {"score": 0.25}}, **({"measures": measures} if measures else {}))]})
        (folder / RunFolder.LOG).write_text(json.dumps(dict(kind="train", step=4, recon=99.0,
                                                            kl=9.0, syn=9.0)) + "\n")
    assert study.final_values(tmp_path / "new") == dict(recon=1.0, kl=2.0, elbo=-3.0, i_max=0.5,
                                                        mig=0.25)
    assert study.final_values(tmp_path / "old") == dict(mig=0.25)
    assert math.isclose(study.final_values(tmp_path / "new")["i_max"], 0.5)
