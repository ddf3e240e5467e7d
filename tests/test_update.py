"""What one training step does to the parameters, for every objective."""
import copy

import pytest
import torch

from model import VAE, bernoulli_loss, kl_loss
from config import Config
from solver import Solver
from synergy import synergy_penalty


def make_solver(tmp_path, **overrides):
    """A small Solver; ``--update two-step`` unless the test says otherwise."""
    config = Config(**{**dict(grid="reduced", batch_size=16, cuda=False, seed=7, alpha=5.0,
                              omega=0.9, update="two-step"), **overrides})
    return Solver(config, tmp_path)


def spy_on_steps(solver, optimizer):
    """Record, at every optimizer.step(), the parameters and gradients it is about to use."""
    calls = []
    step = optimizer.step

    def spy(*args, **kwargs):
        calls.append({name: (p.detach().clone(), None if p.grad is None else p.grad.clone())
                      for name, p in solver.model.named_parameters()})
        return step(*args, **kwargs)

    optimizer.step = spy
    return calls


def first_step(tmp_path, **overrides):
    """A small Solver after one train step: (solver, its model before the step, the RNG state
    the step started from, the optimizer.step() calls seen, what train_step returned)."""
    solver = make_solver(tmp_path, **overrides)
    before = copy.deepcopy(solver.model)
    rng = torch.get_rng_state()
    calls = spy_on_steps(solver, solver.optim)
    return solver, before, rng, calls, solver.train_step()


def grads(loss, params, **kwargs):
    return torch.autograd.grad(loss, list(params), **kwargs)


def replay_first_batch(solver, model, rng):
    """recon, KL, mu, logvar of the solver's first batch through ``model``, with the noise the
    solver drew from RNG state ``rng``."""
    torch.set_rng_state(rng)
    x = solver.batches.train(0)
    logits, mu, logvar, _ = model(x)
    return bernoulli_loss(logits, x), kl_loss(mu, logvar), mu, logvar


def assert_step_used(call, expected):
    """The gradients one optimizer.step() saw equal ``expected``, parameter by parameter."""
    for (name, (_, got)), e in zip(call.items(), expected, strict=True):
        assert torch.allclose(got, e, rtol=1e-4, atol=1e-6), name


def test_parameter_count_is_the_originals():
    assert sum(p.numel() for p in VAE(10).parameters()) == 498005


def test_two_step_second_gradient_is_the_synergy_gradient_at_the_pre_step_parameters(tmp_path):
    solver, before, rng, calls, _ = first_step(tmp_path)
    assert len(calls) == 2

    recon, kl, mu, logvar = replay_first_batch(solver, before, rng)
    assert_step_used(calls[0], grads(recon + kl, before.parameters(), retain_graph=True))
    syn, _ = synergy_penalty(mu, logvar, 0.9, 5.0)
    assert syn > 0
    g_syn = dict(zip([n for n, _ in before.encoder.named_parameters()],
                     grads(syn, before.encoder.parameters()), strict=True))
    for name, (_, second) in calls[1].items():
        module, _, rest = name.partition(".")
        if module == "encoder":
            assert torch.allclose(second, g_syn[rest], rtol=1e-4, atol=1e-7), name
            assert second.abs().sum() > 0
        else:
            assert torch.count_nonzero(second) == 0, name  # explicit zeros, not None


def test_second_adam_step_moves_the_decoder_by_momentum_and_counts_twice(tmp_path):
    solver = make_solver(tmp_path)
    calls = spy_on_steps(solver, solver.optim)
    solver.train_step()
    lr, eps = solver.config.lr_VAE, 1e-8
    b1, b2 = solver.config.beta1_VAE, solver.config.beta2_VAE
    for name, p in solver.model.decoder.named_parameters():
        p0, g = calls[0]["decoder." + name]
        m1, v1 = (1 - b1) * g, (1 - b2) * g * g
        p1 = p0 - lr * (m1 / (1 - b1)) / ((v1 / (1 - b2)).sqrt() + eps)
        m2, v2 = b1 * m1, b2 * v1  # zero gradient: the moments decay, the parameter still moves
        p2 = p1 - lr * (m2 / (1 - b1 ** 2)) / ((v2 / (1 - b2 ** 2)).sqrt() + eps)
        assert torch.allclose(p.detach(), p2, rtol=1e-5, atol=1e-8), name
        assert not torch.allclose(p2, p1)
    assert all(int(s["step"]) == 2 for s in solver.optim.state.values())
    assert len(solver.optim.state) == len(list(solver.model.parameters()))


def test_sample_mode_takes_the_synergy_gradient_after_the_first_step(tmp_path):
    solver = make_solver(tmp_path, sample="sample")
    calls = spy_on_steps(solver, solver.optim)
    solver.train_step()
    after_first = copy.deepcopy(solver.model)
    after_first.load_state_dict({n: p for n, (p, _) in calls[1].items()}, strict=False)
    x2 = solver.batches.partner(0)
    mu, logvar = after_first.encoder(x2)
    syn, _ = synergy_penalty(mu, logvar, 0.9, 5.0)
    expected = grads(syn, after_first.encoder.parameters())
    got = [g for n, (_, g) in calls[1].items() if n.startswith("encoder.")]
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_joint_update_is_one_step_on_the_sum(tmp_path):
    solver, before, rng, calls, _ = first_step(tmp_path, update="joint")
    assert len(calls) == 1
    recon, kl, mu, logvar = replay_first_batch(solver, before, rng)
    syn, _ = synergy_penalty(mu, logvar, 0.9, 5.0)
    assert_step_used(calls[0], grads(recon + kl + syn, before.parameters()))


def test_joint_update_with_sample_takes_the_penalty_on_the_partner_batch_at_the_same_step(tmp_path):
    solver, before, rng, calls, _ = first_step(tmp_path, update="joint", sample="sample")
    assert len(calls) == 1
    recon, kl, _, _ = replay_first_batch(solver, before, rng)
    mu2, logvar2 = before.encoder(solver.batches.partner(0))
    syn, _ = synergy_penalty(mu2, logvar2, 0.9, 5.0)
    assert syn > 0
    assert_step_used(calls[0], grads(recon + kl + syn, before.parameters()))


@pytest.mark.parametrize("metric", ["VAE", "BVAE", "BVAE_gt"])
def test_baselines_do_not_optimise_synergy(tmp_path, metric):
    solver, before, rng, calls, (values, _) = first_step(tmp_path, metric=metric, beta=4.0)
    assert len(calls) == 1 and values["syn"] > 0 and not values["syn"].requires_grad
    recon, kl, _, _ = replay_first_batch(solver, before, rng)
    beta = 4.0 if metric in ("BVAE", "BVAE_gt") else 1.0
    assert_step_used(calls[0], grads(recon + beta * kl, before.parameters()))


def test_factor_discriminator_step_leaves_the_vae_gradients_alone(tmp_path):
    solver = make_solver(tmp_path, metric="Factor")
    d_before = copy.deepcopy(solver.D)
    calls = spy_on_steps(solver, solver.optim)
    values, _ = solver.train_step()
    assert set(values) >= {"recon", "kl", "syn", "tc", "d_loss"}
    for name, p in solver.model.named_parameters():  # the D loss did not touch the encoder
        assert torch.equal(p.grad, calls[0][name][1]), name
    pairs = zip(d_before.parameters(), solver.D.parameters(), strict=True)
    moved = [not torch.equal(a, b) for a, b in pairs]
    assert all(moved)


@pytest.mark.slow
def test_benchmark_runs_every_variant(capsys):
    import benchmark
    from precision import native_bf16
    median = benchmark.main(["--steps", "1", "--rounds", "1", "--batch_size", "8"])
    expected = {"VAE step", "FactorVAE", "Non-Syn original", "Non-Syn original NCHW",
                "Non-Syn two-step", "Non-Syn joint", "greedy selection",
                "Non-Syn original @7adde97", "VAE step @7adde97", "FactorVAE @7adde97"}
    if native_bf16("cpu"):
        expected |= {"Non-Syn original bf16", "VAE step bf16"}
    assert set(median) == expected
    assert all(t > 0 for t in median.values())
    out = capsys.readouterr().out
    assert "selection share of the two-step step" in out
    assert "Non-Syn original        " in out and "x  vs Non-Syn original @7adde97" in out


@pytest.mark.slow
def test_the_device_check_runs_end_to_end_on_the_cpu(capsys):
    """``benchmark.py --device-check`` is written for a GPU machine; here it runs as a smoke
    check: the GPU tests skip, and the packed-trial and encoding measurements run on the CPU."""
    import benchmark
    results = benchmark.main(["--device-check", "--steps", "2", "--packs", "2", "--grid",
                              "reduced", "--batch_size", "8"])
    out = capsys.readouterr().out
    assert results["tests"] in (0, 5)  # all skipped without CUDA
    assert "GPU tests (tests/test_gpu.py):" in out and "skipped" in out
    assert results["one trial fp32"] > 0 and results["packed 2"] > 0
    assert "2 packed trials, fp32:" in out and results["encoding fp32"] > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_profile_times_every_phase_at_either_precision(capsys, precision):
    """``benchmark.py --profile [--precision bf16]``: the phases of the original update, the
    convolution FLOPs and the machine's rate for them, in the profiled step's precision."""
    import benchmark
    from precision import native_bf16
    if precision == "bf16" and not native_bf16("cpu"):
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 or AMX): --precision bf16 is refused")
    result = benchmark.main(["--profile", "--precision", precision, "--steps", "1", "--rounds",
                             "1", "--batch_size", "8"])
    phases = result["phases"]
    assert len(phases) == 7 and all(t > 0 for t in phases.values())
    assert any(name.startswith("backward of the synergy") for name in phases)
    assert result["flops"] == benchmark.step_flops(VAE(), 8) > 0
    out = capsys.readouterr().out
    assert f"step in {precision}" in out and f"{precision} GEMM 2048^3" in out
