"""The field's regularisers (objectives.py) against their definitions, written out literally."""
import json
import math

import numpy as np
import pytest
import torch

from types import SimpleNamespace

from objectives import (FIELD, annealed_capacity, covariance, dip_penalty, gaussian_log_density,
                        total_correlation)


def posterior(batch=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(batch, k, generator=g, dtype=torch.float64)
    logvar = torch.randn(batch, k, generator=g, dtype=torch.float64) * 0.5
    z = mu + torch.randn(batch, k, generator=g, dtype=torch.float64) * (0.5 * logvar).exp()
    return z, mu, logvar


def test_gaussian_log_density_is_the_normal_log_density():
    z, mu, logvar = posterior()
    expected = torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(z)
    assert torch.allclose(gaussian_log_density(z, mu, logvar), expected)


def test_total_correlation_is_the_minibatch_weighted_estimate_written_out():
    z, mu, logvar = posterior()
    b, k = mu.shape
    n = lambda j, i, l: math.exp(gaussian_log_density(z[j, l], mu[i, l], logvar[i, l]).item())
    terms = []
    for j in range(b):
        log_qz = math.log(sum(math.prod(n(j, i, l) for l in range(k)) for i in range(b)))
        log_prod = sum(math.log(sum(n(j, i, l) for i in range(b))) for l in range(k))
        terms.append(log_qz - log_prod)
    assert total_correlation(z, mu, logvar).item() == pytest.approx(np.mean(terms), rel=1e-9)


def test_total_correlation_vanishes_for_one_latent_or_one_image():
    z, mu, logvar = posterior(k=1)
    assert total_correlation(z, mu, logvar).item() == pytest.approx(0, abs=1e-12)
    z, mu, logvar = posterior(batch=1)
    assert total_correlation(z, mu, logvar).item() == pytest.approx(0, abs=1e-12)


def test_btcvae_adds_beta_minus_one_tc_and_has_gradients():
    z, mu, logvar = posterior()
    mu.requires_grad_(True)
    kl = torch.tensor(3.0, dtype=torch.float64)
    tc = total_correlation(z, mu, logvar)
    value, terms = FIELD["BTCVAE"](SimpleNamespace(beta=6.0), 0, kl, z, mu, logvar)
    assert value.item() == pytest.approx(3.0 + 5.0 * tc.item())
    assert terms["tc"].item() == pytest.approx(tc.item())
    plain, _ = FIELD["BTCVAE"](SimpleNamespace(beta=1.0), 0, kl, z, mu, logvar)
    assert plain.item() == pytest.approx(3.0)
    value.backward()
    assert mu.grad is not None and torch.isfinite(mu.grad).all() and mu.grad.abs().sum() > 0


def test_covariance_is_the_biased_batch_covariance():
    _, mu, _ = posterior(batch=50, k=4)
    assert np.allclose(covariance(mu).numpy(), np.cov(mu.numpy(), rowvar=False, bias=True))


def test_dip_regularisers_by_hand():
    # two latents over four images: Cov[mu] = [[1, 0.5], [0.5, 1]] (means 0, biased)
    mu = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    mu = mu * torch.tensor([1.0, math.sqrt(2)], dtype=torch.float64)
    cov = covariance(mu)
    assert torch.allclose(cov, torch.tensor([[1.0, math.sqrt(2) / 2], [math.sqrt(2) / 2, 1.0]],
                                            dtype=torch.float64))
    kl = torch.tensor(2.0, dtype=torch.float64)
    logvar = torch.full_like(mu, math.log(0.5))
    # type i: off-diagonal 2 * (sqrt(2)/2)^2 = 1, diagonal (1 - 1)^2 = 0
    assert dip_penalty(mu, logvar, 10.0, 10.0, "i").item() == pytest.approx(10 * 1)
    # type ii: the diagonal gains E[exp(logvar)] = 0.5: 2 * 0.5^2 = 0.5, times lambda_d = 1 * 10
    assert dip_penalty(mu, logvar, 10.0, 1.0, "ii").item() == pytest.approx(10 * 1 + 10 * 0.5)
    settings = SimpleNamespace(lambda_od=10.0, lambda_d_factor=1.0)
    value, terms = FIELD["DIPVAE2"](settings, 0, kl, None, mu, logvar)
    assert value.item() == pytest.approx(2 + 10 * 1 + 10 * 0.5)  # KL + the penalty
    assert terms["dip"].item() == pytest.approx(10 * 1 + 10 * 0.5)
    with pytest.raises(ValueError, match="dip_type"):
        dip_penalty(mu, logvar, 10.0, 1.0, "iii")


def test_annealed_capacity_and_regulariser():
    assert annealed_capacity(0, 25.0, 100000) == 0.0  # the first step
    assert annealed_capacity(50000, 25.0, 100000) == pytest.approx(12.5)
    assert annealed_capacity(100000, 25.0, 100000) == annealed_capacity(300000, 25.0, 100000) == 25
    kl = torch.tensor(20.0)
    settings = SimpleNamespace(c_max=25.0, c_steps=100000, c_gamma=1000.0)
    value, terms = FIELD["AnnealedVAE"](settings, 50000, kl, None, None, None)
    assert value.item() == pytest.approx(7500.0) and terms["capacity"].item() == 12.5
    assert FIELD["AnnealedVAE"](settings, 200000, kl, None, None, None)[0].item() == \
        pytest.approx(5000.0)


# --- the objectives as --metric choices ------------------------------------------------------

def train_records(run_dir):
    """A run's training records and its settings."""
    from conftest import records
    return records(run_dir), json.loads((run_dir / "config.json").read_text())["config"]


def test_field_objectives_name_their_runs_and_labels(tmp_path):
    from config import build_parser, default_run_name, make_config
    from config import objective_label
    parser = build_parser()
    config = make_config(parser.parse_args(["--metric", "DIPVAE2", "--seed", "1"]))
    assert default_run_name(config).startswith("DIPVAE2_lambda_od10.0_lambda_d_factor1.0_seed1_")
    assert objective_label(config.to_dict()) == "DIP-VAE-II (lambda_od 10, lambda_d_factor 1)"
    assert objective_label({"metric": "DIPVAE2"}) == "DIP-VAE-II (lambda_od 10, lambda_d_factor 1)"
    assert objective_label({"metric": "BTCVAE", "beta": 6.0}) == "beta-TCVAE (beta 6)"
    assert objective_label({"metric": "AnnealedVAE"}) == "AnnealedVAE (c_max 25)"
    for metric, factor in (("DIPVAE1", 10.0), ("DIPVAE2", 1.0), ("BTCVAE", 10.0)):
        assert make_config(parser.parse_args(["--metric", metric])).lambda_d_factor == factor
    given = parser.parse_args(["--metric", "DIPVAE2", "--lambda-d-factor", "3"])
    assert make_config(given).lambda_d_factor == 3.0


@pytest.mark.parametrize("flag, value, message", [
    ("--lambda_od", "-1", "must be >= 0"), ("--c_steps", "0", "must be >= 1"),
    ("--c_steps", "2.5", "not a whole number"), ("--c_max", "nan", "finite"),
    ("--lambda_d_factor", "x", "not a number")])
def test_bad_field_settings_are_refused_in_one_line(tmp_path, capsys, flag, value, message):
    from conftest import run_cli
    with pytest.raises(SystemExit) as refused:
        run_cli(tmp_path, "bad", "--metric", "AnnealedVAE", flag, value)
    assert refused.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in line and f"argument {flag}:" in line
    assert [p.name for p in tmp_path.iterdir()] == ["no-data"]  # no run folder


def test_the_field_preset_runs_every_objective_with_dlib_settings(tmp_path):
    import study
    spec = study.make_spec(*study.parse_args(["--out", str(tmp_path / "s"), "--preset", "field",
                                              "--seeds", "2"]))
    names = [t["name"] for t in study.expand(spec)]
    assert names == [f"{n}_seed{s}" for n in (
        "Test_gt_alpha5.0_omega0.9", "BVAE_beta4.0", "Factor_gamma6.4", "Factor_gamma10.0",
        "BTCVAE_beta6.0", "DIPVAE1_lambda_od10.0", "DIPVAE2_lambda_od10.0", "AnnealedVAE_c_max25.0",
        "VAE") for s in (1, 2)]
    settings = {}  # disentanglement_lib's settings, as each trial's run.py flags give them
    for trial in study.expand(spec):
        argv = study.trial_argv(spec, trial, tmp_path)
        flags = dict(zip(argv[::2], argv[1::2], strict=True))
        settings[trial["name"].split("_seed")[0]] = {k: v for k, v in flags.items() if k not in (
            "--metric", "--seed", "--output_dir", "--run-name")}
    assert settings == {
        "Test_gt_alpha5.0_omega0.9": {"--alpha": "5.0", "--omega": "0.9"},
        "BVAE_beta4.0": {"--beta": "4.0"}, "Factor_gamma6.4": {"--gamma": "6.4"},
        "Factor_gamma10.0": {"--gamma": "10.0"}, "BTCVAE_beta6.0": {"--beta": "6.0"},
        "DIPVAE1_lambda_od10.0": {"--lambda_od": "10.0"},
        "DIPVAE2_lambda_od10.0": {"--lambda_od": "10.0"},
        "AnnealedVAE_c_max25.0": {"--c_max": "25.0"}, "VAE": {}}
    # --metric narrows the preset to some of its objectives, with their settings
    narrowed = study.make_spec(*study.parse_args(["--out", str(tmp_path / "s"), "--preset",
                                                  "field", "--metric", "VAE", "BTCVAE"]))
    assert [t["name"] for t in study.expand(narrowed)] == ["VAE_seed1", "BTCVAE_beta6.0_seed1"]
    assert not (tmp_path / "s").exists()


# --- one Solver step of each field objective against its loss written out --------------------

class FixedBatch:
    """The same batch for every step (and as the partner batch)."""

    def __init__(self, x):
        self.x = x

    def train(self, step):
        return self.x

    def partner(self, step):
        return self.x


def written_out_loss(metric, config, step, model, x, eps):
    """recon + the objective's regulariser from the papers' formulas, computed here without
    the project's loss functions: (loss, {term: value})."""
    b = x.shape[0]
    mu, logvar = model.encoder(x)
    z = mu + eps * torch.exp(0.5 * logvar)
    logits = model.decoder(z)
    recon = -(x * torch.nn.functional.logsigmoid(logits)
              + (1 - x) * torch.nn.functional.logsigmoid(-logits)).sum() / b
    kl = 0.5 * (mu ** 2 + logvar.exp() - logvar - 1).sum() / b
    if metric == "BTCVAE":  # log q(z_j) - sum_l log q(z_jl), q summed over the batch's i
        std = torch.exp(0.5 * logvar)
        rows = []
        for j in range(b):
            dens = torch.stack([torch.distributions.Normal(mu[i], std[i]).log_prob(z[j])
                                for i in range(b)])  # (i, l)
            rows.append(torch.logsumexp(dens.sum(1), 0) - torch.logsumexp(dens, 0).sum())
        tc = torch.stack(rows).mean()
        return recon + kl + (config.beta - 1) * tc, dict(tc=tc)
    if metric in ("DIPVAE1", "DIPVAE2"):
        cov = torch.cov(mu.T, correction=0)
        if metric == "DIPVAE2":
            cov = cov + torch.diag(logvar.exp().mean(0))
        off = cov - torch.diag(torch.diag(cov))
        dip = config.lambda_od * (off ** 2).sum() + \
            config.lambda_d_factor * config.lambda_od * ((torch.diag(cov) - 1) ** 2).sum()
        return recon + kl + dip, dict(dip=dip)
    assert metric == "AnnealedVAE"
    capacity = config.c_max * min(1.0, step / config.c_steps)
    return recon + config.c_gamma * (kl - capacity).abs(), dict(capacity=torch.tensor(capacity))


@pytest.mark.parametrize("metric, settings, step", [
    ("BTCVAE", dict(beta=6.0), 0), ("DIPVAE1", dict(lambda_od=2.0), 0),
    ("DIPVAE2", dict(lambda_od=10.0), 0),
    ("AnnealedVAE", dict(c_max=25.0, c_steps=10, c_gamma=1000.0), 5)])
def test_one_step_is_adam_on_the_loss_written_out(tmp_path, metric, settings, step):
    """On a fixed batch of real images and fixed noise, the step's ``total`` and terms are
    the loss written out above, and the parameters after it are torch.optim.Adam's after one
    step on that loss (AnnealedVAE at c_steps / 2: C = c_max / 2)."""
    import copy
    from config import Config
    from solver import Solver
    config = Config(metric=metric, grid="reduced", batch_size=8, cuda=False, seed=3, **settings)
    eps = torch.randn(8, config.z_dim, generator=torch.Generator().manual_seed(1))
    batch = FixedBatch(None)
    solver = Solver(config, tmp_path, batches=batch, noise=lambda mu: eps.to(mu))
    batch.x = x = solver.data.images(torch.arange(0, 8 * 1439, 1439))
    solver.step = step
    before = copy.deepcopy(solver.model)
    reference = copy.deepcopy(solver.model)

    values, _ = solver.train_step()

    loss, terms = written_out_loss(metric, config, step, reference, x, eps)
    assert values["total"].item() == pytest.approx(loss.item(), rel=1e-5)
    for name, value in terms.items():
        assert values[name].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-6)
    adam = torch.optim.Adam(reference.parameters(), lr=config.lr_VAE,
                            betas=(config.beta1_VAE, config.beta2_VAE))
    adam.zero_grad()
    loss.backward()
    adam.step()
    # Adam's first step is about lr * sign(gradient): a gradient entry within float32
    # rounding of 0 may move its weight either way, so each tensor's update is compared as a
    # whole, and the gradients themselves entry by entry
    after, expected = dict(solver.model.named_parameters()), dict(reference.named_parameters())
    for name, p in dict(before.named_parameters()).items():
        grad, expected_grad = after[name].grad, expected[name].grad
        assert torch.allclose(grad, expected_grad, rtol=1e-3,
                              atol=1e-4 * expected_grad.abs().max().item()), name
        update, expected_update = after[name] - p, expected[name] - p
        assert expected_update.norm() > 0, f"{name} did not move"
        assert (update - expected_update).norm() <= 0.01 * expected_update.norm(), name


@pytest.mark.slow
def test_a_field_study_tests_each_objective_against_nonsyn_and_draws_the_thesis_roles(tmp_path):
    """The field preset's study machinery on three of its objectives (two seeds, a few steps on
    the reduced grid): every trial logs synergy, the summary has a row per configuration with
    both seeds, Welch's tests pit every other configuration against Non-Syn VAE only, and
    figures.py draws the thesis's three roles from it. (Every objective's own run, its logged
    terms and the preset's settings for each are checked in process: test_cli's
    every-experiment test, the dlib-settings test above.)"""
    import csv
    import study
    from conftest import no_data
    out = tmp_path / "field"
    argv = ["--out", str(out), "--preset", "field", "--metric", "Test_gt", "Factor", "VAE",
            "--seeds", "2", "--workers", "2", "--",
            "--grid", "reduced", "--batch_size", "8", "--steps", "4", "--log-interval", "2",
            "--save-interval", "4", "--gt-interval", "4", "--eval-metrics", "none", "--no-cuda",
            "--nb-test", "2", "--eval-sample", "200", "--data-dir", str(no_data(tmp_path))]
    assert study.main(argv) == 0
    trials = json.loads((out / "study.json").read_text())["trials"]
    assert len(trials) == 8 and {t["state"] for t in trials} == {"finished"}
    for trial in trials:
        rows, config = train_records(out / trial["name"])
        assert [r["step"] for r in rows] == [2, 4]
        assert {"syn", "i_max"} <= set(rows[0])  # synergy measured by every objective
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["metric"] for r in rows] == ["Test_gt", "Factor", "Factor", "VAE"]
    assert {r["n"] for r in rows} == {"2"} and all(r["i_max_n"] == "2" for r in rows)
    with open(out / "ttests.csv") as f:
        tests = list(csv.DictReader(f))
    nonsyn = rows[0]["label"]
    assert {t["a"] for t in tests} == {nonsyn}
    assert {t["b"] for t in tests} == {r["label"] for r in rows[1:]}
    assert "each objective against Non-Syn VAE" in (out / "summary.md").read_text()
    # figures.py --study draws the thesis's three roles and lists every configuration
    import figures
    assert figures.main(["--study", str(out), "--out", str(tmp_path / "misc")]) == 0
    table = json.loads((tmp_path / "misc" / "comparison.json").read_text())
    assert [row["metric"] for row in table] == ["Test_gt", "Factor", "VAE", "Factor"]
    assert all(row["folder"].endswith("_seed1") for row in table)
    assert [row["run"] for row in table[:2]] == ["Non-Syn VAE", "FactorVAE (gamma 6.4), seed 1"]
    assert sorted(p.name for p in (tmp_path / "misc" / "runs").iterdir()) == [
        "Factor_gamma6.4_seed1", "Test_gt_alpha5.0_omega0.9_seed1", "VAE_seed1"]
