"""--precision: parsing, the refusal where bf16 is not native, the config / resume round trip, and
that bf16 changes only the networks' arithmetic (fp32 weights, optimiser state, losses, KLs and
greedy policy). Also the speed settings that keep fp32 faithful: channels-last networks and the
allocator that keeps freed memory."""
import json
import os
import resource
import signal

import pytest
import torch

import precision
import representation
import solver as solver_module
import study
from conftest import layer_dtypes, records, run_cli
from run import main
from config import Config
from solver import Solver
from utils import ConfigError, keep_freed_memory

native = pytest.mark.skipif(not precision.native_bf16("cpu"),
                            reason="this CPU has no native bf16 (AVX512-BF16 / AMX)")


def without_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f"})


def test_precision_is_fp32_by_default_and_takes_only_known_values(tmp_path, capsys):
    assert Config().precision == "fp32"
    with pytest.raises(SystemExit) as exit_:
        run_cli(tmp_path, "r", "--precision", "fp16")
    assert exit_.value.code == 2
    assert "--precision: invalid choice: 'fp16'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16"):
        Config(precision="half")
    assert not (tmp_path / "r").exists()


def test_fp32_on_cuda_turns_off_tensorfloat32(monkeypatch):
    """PyTorch's default lets cuDNN round fp32 convolutions to TF32; a run on CUDA turns that off
    (the GPU replay test measures the effect; here the device choice is faked)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    try:
        cudnn.allow_tf32 = matmul.allow_tf32 = True
        assert precision.pick_device(Config(cuda=False)).type == "cpu"
        assert cudnn.allow_tf32 and matmul.allow_tf32  # a CPU run leaves them alone
        monkeypatch.setattr(precision, "config_device", lambda config: torch.device("cuda"))
        assert precision.pick_device(Config()).type == "cuda"
        assert not cudnn.allow_tf32 and not matmul.allow_tf32
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def test_native_bf16_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert precision.native_bf16("cpu")
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "amx_bf16", "amx_tile"})
    assert precision.native_bf16("cpu")
    without_bf16(monkeypatch)
    assert not precision.native_bf16("cpu")


def test_bf16_without_native_support_is_refused_at_once_and_writes_nothing(tmp_path, monkeypatch,
                                                                          capsys):
    without_bf16(monkeypatch)
    assert run_cli(tmp_path, "r", "--precision", "bf16") == (2, tmp_path / "r")
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--precision bf16 needs native bf16" in err and "--precision fp32" in err
    assert [p.name for p in tmp_path.iterdir()] == ["no-data"]  # nothing but the empty data folder
    assert run_cli(tmp_path, "r", "--precision", "bf16", "--dry-run")[0] == 2  # studies check so
    with pytest.raises(ConfigError, match="needs native bf16"):
        Solver(Config(precision="bf16", grid="reduced", cuda=False), tmp_path / "s")


@native
def test_a_bf16_run_records_its_precision_keeps_it_on_resume_and_resumes_exactly(
        tmp_path, monkeypatch, at_step):
    flags = ["--precision", "bf16", "--steps", "9", "--save-interval", "4", "--seed", "5"]
    assert run_cli(tmp_path, "straight", *flags)[0] == 0
    at_step(6, lambda solver: os.kill(os.getpid(), signal.SIGTERM))
    code, run_dir = run_cli(tmp_path, "resumed", *flags)
    assert code == 130
    monkeypatch.undo()
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert config["precision"] == "bf16"
    assert main(["--resume", str(run_dir), "--precision", "fp32"]) == 2  # fixed by the run
    assert main(["--resume", str(run_dir)]) == 0
    checkpoint = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    assert checkpoint["config"]["precision"] == "bf16"
    straight = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)
    assert all(torch.equal(straight["model"][k], checkpoint["model"][k]) for k in straight["model"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(records(run_dir)) == strip(records(tmp_path / "straight"))


@native
def test_a_bf16_run_is_not_resumed_where_bf16_is_not_native(tmp_path, monkeypatch, capsys):
    code, run_dir = run_cli(tmp_path, "r", "--precision", "bf16", "--steps", "3")
    assert code == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    without_bf16(monkeypatch)
    assert main(["--resume", str(run_dir), "--steps", "6"]) == 2
    assert "--precision bf16 needs native bf16" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@native
@pytest.mark.parametrize("metric", ["Test_gt", "Factor"])
def test_bf16_runs_only_the_networks_layers_in_bf16(tmp_path, monkeypatch, metric):
    """Convolutions and linear layers compute in bf16; the networks hand back fp32, and the
    KLs the greedy policy sees, the losses, the weights and Adam's moments stay fp32."""
    seen_kl = []
    greedy = solver_module.synergy_penalty.__globals__["greedy_best_set"]

    def spy(kl, omega):
        seen_kl.append(kl.dtype)
        return greedy(kl, omega)
    monkeypatch.setitem(solver_module.synergy_penalty.__globals__, "greedy_best_set", spy)
    s = Solver(Config(metric=metric, precision="bf16", grid="reduced", batch_size=16, cuda=False,
                      alpha=5.0, omega=0.9), tmp_path)
    dtypes = layer_dtypes(s.model)
    for _ in range(3):
        values, best = s.advance()
    assert dtypes == {torch.bfloat16}
    assert seen_kl and set(seen_kl) == {torch.float32}
    assert all(v.dtype == torch.float32 for v in values.values())
    params = list(s.model.parameters()) + (list(s.D.parameters()) if s.D else [])
    assert {p.dtype for p in params} == {torch.float32}
    moments = [t for state in s.optim.state.values() for t in state.values()
               if isinstance(t, torch.Tensor) and t.numel() > 1]
    assert moments and {t.dtype for t in moments} == {torch.float32}


@native
def test_bf16_changes_the_arithmetic_only_a_little(tmp_path):
    """Same seed, same data: after 5 steps the bf16 run's losses are near the fp32 run's and
    not equal to them (the flag does change the arithmetic)."""
    runs = {}
    for p in ("fp32", "bf16"):
        s = Solver(Config(precision=p, grid="reduced", batch_size=16, cuda=False, alpha=5.0,
                          omega=0.9), tmp_path / p)
        runs[p] = [s.advance()[0] for _ in range(5)]
    for fp32, bf16 in zip(runs["fp32"], runs["bf16"], strict=True):
        assert abs(bf16["recon"] - fp32["recon"]) <= 0.02 * fp32["recon"]
        assert abs(bf16["kl"] - fp32["kl"]) <= 0.05 * fp32["kl"] + 0.05
    assert runs["fp32"][-1]["recon"] != runs["bf16"][-1]["recon"]


@pytest.mark.slow  # 25 s where bf16 is emulated
def test_the_encoding_pass_with_bf16_stays_close_to_fp32(tmp_path):
    s = Solver(Config(grid="reduced", cuda=False), tmp_path)
    fp32 = representation.encode_all(s.model, s.data, "fp32")
    bf16 = representation.encode_all(s.model, s.data, "bf16")
    assert fp32.dtype == bf16.dtype == "float32" and fp32.shape == bf16.shape
    assert abs(fp32 - bf16).max() < 0.05 and (fp32 != bf16).any()


def test_channels_last_networks_compute_what_nchw_ones_do(tmp_path):
    """The default layout changes only the order of float sums: 3 steps of the default update
    from the same weights agree with the NCHW step to float rounding."""
    config = Config(grid="reduced", batch_size=16, cuda=False, alpha=5.0, omega=0.9)

    def noise():  # each Solver its own stream, the same numbers
        generator = torch.Generator().manual_seed(0)
        return lambda mu: torch.randn(mu.shape, generator=generator)
    fast = Solver(config, tmp_path / "a", noise=noise())
    plain = Solver(config, tmp_path / "b", noise=noise(), memory_format=torch.contiguous_format)
    conv = fast.model.encoder.net[2].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert plain.model.encoder.net[2].weight.is_contiguous()
    plain.model.load_state_dict(fast.model.state_dict())
    for _ in range(3):
        a, b = fast.advance()[0], plain.advance()[0]
        for term in ("recon", "kl", "syn"):
            assert abs(a[term] - b[term]) <= 1e-4 * max(1.0, abs(b[term])), term
    for (name, p), q in zip(fast.model.named_parameters(), plain.model.parameters(), strict=True):
        assert ((p - q).norm() / q.norm()).item() <= 1e-4, name  # the replay test allows 2e-3
    assert any(not torch.equal(p, q) for p, q in zip(fast.model.parameters(),
                                                     plain.model.parameters()))


def test_freed_memory_is_kept_for_the_next_step():
    """With the allocator setting, freeing and re-allocating a step-sized tensor (8 MB) touches
    no fresh pages; glibc's default hands such blocks back to the kernel every time."""
    assert keep_freed_memory()
    torch.empty(2 << 20).fill_(1)  # grows the heap once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(2 << 20).fill_(1)
    # 10 x 2,048 faults without the setting; the count is the whole process's, so other
    # threads of a long test session add a few hundred: the bound is one allocation's worth
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 2048


def test_a_study_takes_precision_as_an_axis_of_every_objective(tmp_path):
    spec = study.make_spec(*study.parse_args(["--out", str(tmp_path / "s"), "--metric", "Test_gt",
                                              "VAE", "--alpha", "5", "--precision", "fp32",
                                              "bf16"]))
    trials = study.expand(spec)
    assert [t["name"] for t in trials] == [
        "Test_gt_alpha5.0_fp32_seed1", "Test_gt_alpha5.0_bf16_seed1", "VAE_fp32_seed1",
        "VAE_bf16_seed1"]
    argv = study.trial_argv(spec, trials[1], tmp_path)
    assert argv[argv.index("--precision") + 1] == "bf16"
    with pytest.raises(SystemExit):  # the study owns the flag: given after --, it is refused
        study.make_spec(*study.parse_args(["--out", str(tmp_path / "s"), "--metric", "VAE", "--",
                                           "--precision", "bf16"]))
