"""The CUDA path: the original trainer's replay on the GPU, steps without host synchronisation,
interrupt + resume equality with deterministic algorithms, bf16 autocast, and a study packing four
trials on one GPU. Every test skips, saying why, where there is no CUDA device;
``python benchmark.py --device-check`` runs this file on a GPU machine.
"""
import json
import os
import signal

import numpy as np
import pytest
import torch

# cuBLAS reads this when it starts: deterministic matrix products for the resume test
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import study  # noqa: E402
from conftest import QUICK as CPU_QUICK  # noqa: E402
from conftest import layer_dtypes, no_data, records  # noqa: E402
from run import main  # noqa: E402
from config import Config  # noqa: E402
from solver import Solver  # noqa: E402
from conftest import FIXTURE, ReplayBatches, ReplayNoise, in_module_order  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the GPU path is checked on a GPU machine "
                                       "(python benchmark.py --device-check)")
QUICK = [f for f in CPU_QUICK if f != "--no-cuda"] + ["--steps", "9", "--save-interval", "4",
                                                      "--gt-interval", "9"]


class OnDevice:
    """A replay source whose tensors are moved to the GPU."""

    def __init__(self, source, device):
        self.source, self.device = source, device

    def train(self, step):
        return self.source.train(step).to(self.device)

    def partner(self, step):
        return self.source.partner(step).to(self.device)

    def __call__(self, like):
        return self.source(like.cpu()).to(self.device)


@pytest.mark.parametrize("sample", ["no_sample", "sample"])
def test_the_original_trainer_replays_on_cuda(tmp_path, sample):
    """As tests/test_replay.py, on the GPU, with the CPU test's tolerances."""
    original = dict(np.load(FIXTURE))
    config = Config(sample=sample, alpha=5.0, omega=0.9, batch_size=64, grid="reduced")
    device = torch.device("cuda")
    solver = Solver(config, tmp_path, batches=OnDevice(ReplayBatches(original), device),
                    noise=OnDevice(ReplayNoise(original), device))
    assert solver.device.type == "cuda"
    keys = list(solver.model.state_dict())
    solver.model.load_state_dict(dict(zip(keys, in_module_order(original, "init/"), strict=True)))
    for t in range(len(original[f"{sample}/recon"])):
        values, best = solver.advance()
        for term in ("recon", "kl", "syn"):
            got, expected = values[term].item(), original[f"{sample}/{term}"][t]
            assert abs(got - expected) <= 1e-3 * max(abs(expected), 1.0), (t, term, got, expected)
        assert best.cpu().tolist() == original[f"{sample}/best"][t].tolist(), t
    for name, expected in zip(keys, in_module_order(original, f"{sample}/final/"), strict=True):
        got = solver.model.state_dict()[name].cpu()
        assert ((got - expected).norm() / expected.norm()).item() <= 2e-3, name


@pytest.mark.parametrize("metric, update, sample, precision", [
    ("Test_gt", "original", "no_sample", "fp32"), ("Test_gt", "original", "sample", "fp32"),
    ("Test_gt", "two-step", "no_sample", "fp32"), ("Test_gt", "joint", "sample", "fp32"),
    ("VAE", "original", "no_sample", "fp32"), ("Factor", "original", "no_sample", "fp32"),
    ("Test_gt", "original", "no_sample", "bf16")])
def test_a_training_step_never_waits_for_the_host(tmp_path, metric, update, sample, precision):
    """Under sync debug mode "error", any host synchronisation inside a step raises; the steps
    cross a new epoch and a new partner block of the samplers."""
    solver = Solver(Config(metric=metric, update=update, sample=sample, precision=precision,
                           grid="reduced", batch_size=64), tmp_path)
    solver.batches.partners.block = 64  # a new block of partner indices every 64 steps
    solver.advance()  # first-use set-up (cuBLAS handles, the samplers' first draws) outside
    epoch = solver.batches.sampler.steps_per_epoch
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(epoch + 5):
            solver.advance()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    solver.check_finite()


def test_interrupted_and_resumed_run_on_cuda_ends_with_the_same_weights(tmp_path, monkeypatch,
                                                                         at_step):
    torch.use_deterministic_algorithms(True, warn_only=True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    try:
        def run(name):
            return main([*QUICK, "--output_dir", str(tmp_path), "--run-name", name, "--data-dir",
                         str(no_data(tmp_path)), "--seed", "5"])
        assert run("straight") == 0
        at_step(6, lambda solver: os.kill(os.getpid(), signal.SIGTERM))
        assert run("resumed") == 130
        monkeypatch.undo()
        assert main(["--resume", str(tmp_path / "resumed")]) == 0
    finally:
        torch.use_deterministic_algorithms(False)
    straight = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(records(tmp_path / "resumed")) == strip(records(tmp_path / "straight"))


@pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(),
                    reason="this GPU has no bf16")
def test_bf16_on_cuda_runs_the_layers_in_bf16_and_keeps_fp32_state(tmp_path):
    solver = Solver(Config(precision="bf16", grid="reduced", batch_size=64, alpha=5.0, omega=0.9),
                    tmp_path)
    dtypes = layer_dtypes(solver.model)
    for _ in range(20):
        values, _ = solver.advance()
    solver.check_finite()
    assert dtypes == {torch.bfloat16}
    assert all(v.dtype == torch.float32 for v in values.values())
    assert {p.dtype for p in solver.model.parameters()} == {torch.float32}


def test_a_study_packs_four_trials_on_one_gpu(tmp_path):
    out = tmp_path / "s"
    argv = ["--out", str(out), "--metric", "Test_gt", "--seeds", "4", "--alpha", "5",
            "--omega", "0.9", "--trials-per-gpu", "4", "--workers", "4", "--", *QUICK,
            "--data-dir", str(no_data(tmp_path))]
    assert study.main(argv) == 0
    state = json.loads((out / "study.json").read_text())
    assert [t["state"] for t in state["trials"]] == ["finished"] * 4
    for trial in state["trials"]:
        config = json.loads((out / trial["name"] / "config.json").read_text())
        assert config["config"]["cuda"] is True
