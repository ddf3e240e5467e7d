"""Step-time benchmark: the default Non-Syn step against the step as it was before the Speed
work, bf16, the plain VAE, FactorVAE, the other Non-Syn updates and the greedy selection alone.

    python benchmark.py [--batch_size 64] [--steps 30] [--rounds 5] [--threads N] [--cuda]
                        [--visdom-port PORT]
    python benchmark.py --metrics [--grid full | --run RUN_DIR] [--threads N] [--cuda]
    python benchmark.py --study [--trials 4] [--overhead-steps 20] [--rounds 3]
                        [--trial-steps 400]
    python benchmark.py --device-check [--packs 1,4,8,16] [--steps 500] [--grid full]
    python benchmark.py --profile [--precision bf16] [--steps 30] [--rounds 5]

Variants run on the same batch size, interleaved round by round so that machine noise hits them
alike; each line is the median over rounds of the mean step time of the training loop's step
(Solver.advance). The default variants (channels-last, freed memory kept by malloc; bf16 where
the device has it natively; "NCHW": the same with NCHW activations) run in this process; the
"@7adde97" ones, the step as main had it before (NCHW activations, glibc's default malloc), run
in a child process, because the allocator setting is process-wide. With --visdom-port (a running
visdom server) a variant with live plotting at the default gather/push intervals is added.

With --metrics it times an evaluation instead: one encoding pass over the grid, then every
disentanglement metric with its default protocol on those codes (a freshly initialised model,
or with --run a trained one).

With --device-check (on a GPU machine) it runs tests/test_gpu.py, then measures the steps/s of
one trial and of K trials packed on the GPU as study.py --trials-per-gpu K places them (one
process each, a common start), and the encoding pass, each in fp32 and bf16 where supported.

With --study it times study.py's local engine against plain run.py processes (reduced grid, no
evaluation, alone on the machine): the overhead per trial (study.py with one worker x one thread
vs the same trials as back-to-back run.py processes with one thread), and the total training
throughput, in steps/s of wall-clock time, of one trial per core (the default), of one worker
with every core, and of one plain run.py with every core.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from metrics import METRIC_NAMES, METRICS, PROTOCOLS, lookup
from model import kl_loss
from plotting import save_ground_truth_plot
from precision import native_bf16
from config import Config
from representation import Trained, encode_all, grid_summary
from runfolder import RunFolder
from solver import Solver
from synergy import greedy_best_set
from utils import ArgumentParser, usable_cpus


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device, work, repeat=1):
    """(seconds that ``repeat`` calls of ``work`` take on ``device``, synchronised at both ends;
    the last call's result)."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        out = work()
    _sync(device)
    return time.perf_counter() - start, out


@contextmanager
def _workers(flags, k=1, env=None):
    """``k`` child processes of this script in a worker mode (``flags``), each past its "ready"
    line; afterwards their stdin is closed and they are waited for."""
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *flags], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(k)]
    try:
        if any(proc.stdout.readline().strip() != "ready" for proc in procs):
            raise SystemExit(f"error: a benchmark worker ({flags[0]}) did not start")
        yield procs
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait()


def _send(worker, line):
    worker.stdin.write(line + "\n")
    worker.stdin.flush()


def _answer(worker):
    return json.loads(worker.stdout.readline())


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per variant per round (default 30; --device-check: 500 "
                        "per trial)")
    p.add_argument("--rounds", type=int, default=None, help="default 5 (--study: 3, --metrics: 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--cuda", action="store_true", help="benchmark on the GPU")
    p.add_argument("--visdom-port", type=int, help="add a variant streaming to visdom")
    p.add_argument("--metrics", action="store_true", help="time an evaluation instead")
    p.add_argument("--grid", default="full", help="dSprites grid for --metrics, --device-check")
    p.add_argument("--study", action="store_true", help="time study.py's local engine instead")
    p.add_argument("--trials", type=int, default=4, help="with --study: trials for the overhead")
    p.add_argument("--overhead-steps", type=int, default=20,
                   help="with --study: steps of the trials timed for the overhead")
    p.add_argument("--trial-steps", type=int, default=400,
                   help="with --study: steps of the trials timed for the throughput")
    p.add_argument("--run", help="with --metrics: encode with this run's checkpoint (default: a "
                                 "fresh model, whose latents may all be pruned by FactorVAE)")
    p.add_argument("--device-check", action="store_true",
                   help="the GPU check: tests/test_gpu.py, steps/s of one and of K packed "
                        "trials, the full-grid encoding (--grid)")
    p.add_argument("--packs", type=lambda t: [int(k) for k in t.split(",")], default=[1, 4, 8, 16],
                   help="with --device-check: the K of the packed-trial measurements")
    p.add_argument("--profile", action="store_true",
                   help="where the default step's time goes, and its FLOPs against the "
                        "machine's rate for the same convolutions")
    p.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--packed-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="with --profile: the profiled step's precision (bf16: its convolutions "
                        "and the GEMM peak in bf16; needs native bf16)")
    args = p.parse_args(argv)
    args.rounds_given, args.steps_given = args.rounds is not None, args.steps is not None
    args.steps = args.steps or 30
    args.rounds = args.rounds or (3 if args.study else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.metrics and args.baseline_worker:
        return metrics_worker(args)
    if args.metrics:
        return benchmark_metrics(args)
    if args.study:
        return benchmark_study(args)
    if args.baseline_worker:
        return baseline_worker(args)
    if args.packed_worker:
        return packed_worker(args)
    if args.device_check:
        args.steps = args.steps if args.steps_given else 500
        return benchmark_device(args)
    if args.profile:
        return benchmark_profile(args)

    return benchmark_steps(args)


NCHW = dict(memory_format=torch.contiguous_format)
# The step as main was before the Speed work (7adde97): NCHW activations and glibc's default
# malloc. It runs in a child process, because the allocator setting is process-wide.
BASELINE = {"Non-Syn original @7adde97": (dict(metric="Test_gt"), NCHW),
            "VAE step @7adde97": (dict(metric="VAE"), NCHW),
            "FactorVAE @7adde97": (dict(metric="Factor"), NCHW)}
SPEEDUPS = (("Non-Syn original", "Non-Syn original @7adde97"),
            ("Non-Syn original", "Non-Syn original NCHW"),
            ("Non-Syn original bf16", "Non-Syn original @7adde97"),
            ("Non-Syn original bf16", "Non-Syn original"),
            ("VAE step", "VAE step @7adde97"), ("VAE step bf16", "VAE step @7adde97"),
            ("FactorVAE", "FactorVAE @7adde97"))


def step_variants(args, device):
    variants = {"Non-Syn original": (dict(metric="Test_gt"), {}),
                "Non-Syn original NCHW": (dict(metric="Test_gt"), NCHW),
                "VAE step": (dict(metric="VAE"), {}),
                "FactorVAE": (dict(metric="Factor"), {}),
                "Non-Syn two-step": (dict(metric="Test_gt", update="two-step"), {}),
                "Non-Syn joint": (dict(metric="Test_gt", update="joint"), {})}
    if native_bf16(device):
        variants["Non-Syn original bf16"] = (dict(metric="Test_gt", precision="bf16"), {})
        variants["VAE step bf16"] = (dict(metric="VAE", precision="bf16"), {})
    if args.visdom_port:
        variants["original + visdom"] = (dict(metric="Test_gt", viz_on=True,
                                              viz_port=args.visdom_port), {})
    return variants


class Stepper:
    """Solvers of some variants in this process, timed a round at a time."""

    def __init__(self, args, variants, tmp):
        self.steps = args.steps
        self.solvers = {name: Solver(Config(grid="reduced", batch_size=args.batch_size,
                                            cuda=args.cuda, alpha=5.0, omega=0.9, **kw),
                                     tmp, **options)
                        for name, (kw, options) in variants.items()}
        for solver in self.solvers.values():  # warm-up
            for _ in range(5):
                solver.advance()

    def round(self):
        """{variant: mean seconds per step over ``steps`` steps}, one variant after the other."""
        return {name: _clock(solver.device, solver.advance, self.steps)[0] / self.steps
                for name, solver in self.solvers.items()}


def _glibc_default_malloc():
    """Build models as 7adde97 did: freed memory goes back to the kernel (model.build_model
    keeps it warm otherwise). Fails loudly if build_model no longer calls that name."""
    import model
    if not callable(getattr(model, "keep_freed_memory", None)):
        raise AttributeError("model.keep_freed_memory is gone: re-point the baseline's patch")
    model.keep_freed_memory = lambda: False


def baseline_worker(args):
    """``--baseline-worker``: the BASELINE variants with glibc's default malloc, timed a round
    each time a line arrives on stdin; one JSON line of timings answers each."""
    _glibc_default_malloc()
    with tempfile.TemporaryDirectory() as tmp:
        stepper = Stepper(args, BASELINE, tmp)
        print("ready", flush=True)
        for _ in sys.stdin:
            print(json.dumps(stepper.round()), flush=True)


def benchmark_steps(args):
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    worker_flags = ["--baseline-worker", "--steps", str(args.steps), "--batch_size",
                    str(args.batch_size), *(["--threads", str(args.threads)] if args.threads else []),
                    *(["--cuda"] if args.cuda else [])]
    with _workers(worker_flags) as (baseline,), tempfile.TemporaryDirectory() as tmp:
        stepper = Stepper(args, step_variants(args, device), tmp)
        kl = torch.rand(10, device=device)
        timings = {}
        for _ in range(args.rounds):  # interleaved: this process's variants, then the baseline's
            times = stepper.round()
            _send(baseline, "round")
            times.update(_answer(baseline))
            repeat = args.steps * 10
            times["greedy selection"] = _clock(device, lambda: greedy_best_set(kl, 0.9),
                                               repeat)[0] / repeat
            for name, t in times.items():
                timings.setdefault(name, []).append(t)

    median = {name: statistics.median(t) for name, t in timings.items()}
    base = median["VAE step"]
    print(f"device {device}, batch {args.batch_size}, threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}; median of {args.rounds} interleaved rounds x {args.steps} "
          f"steps")
    for name, t in median.items():
        print(f"  {name:26s} {t * 1e3:8.3f} ms   {t / base:5.3f} x VAE step")
    print("speed-ups (> 1: faster than the reference):")
    for name, reference in SPEEDUPS:
        if name in median:
            print(f"  {name:22s} {median[reference] / median[name]:5.2f}x  vs {reference}")
    if "Non-Syn original bf16" not in median:
        print(f"  (no bf16 variants: {device} has no native bf16)")
    for update in ("original", "two-step"):
        share = median["greedy selection"] / median[f"Non-Syn {update}"]
        print(f"  selection share of the {update} step: {share:.2%}")
    if args.visdom_port:
        overhead = median["original + visdom"] / median["Non-Syn original"] - 1
        print(f"  visdom overhead on the original step: {overhead:+.2%}")
    return median


def conv_layers(model):
    """[(layer, multiply-adds of its forward at batch 1, its input's shape at batch 1)] of every
    convolution of ``model``, in the order a forward pass meets them."""
    found, hooks = [], []
    for layer in model.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            def count(m, inputs, out):
                # each output (Conv2d) or input (ConvTranspose2d) element meets c * kh * kw weights
                per = (m.in_channels if isinstance(m, torch.nn.Conv2d) else m.out_channels)
                elems = (out if isinstance(m, torch.nn.Conv2d) else inputs[0])[0].numel()
                found.append((m, elems * per * m.kernel_size[0] * m.kernel_size[1],
                              tuple(inputs[0].shape)))
            hooks.append(layer.register_forward_hook(count))
    with torch.no_grad():
        model(torch.zeros(1, 1, 64, 64))
    for hook in hooks:
        hook.remove()
    return found


def step_flops(model, batch_size):
    """Floating-point operations of one default (original) Non-Syn step in its convolutions: the
    forward of both networks, their backward (input and weight gradients; the first layer needs
    no input gradient), and the second backward through the encoder for the synergy gradient."""
    layers = conv_layers(model)
    encoder = {id(m) for m in model.encoder.modules()}
    fwd_enc = sum(f for m, f, _ in layers if id(m) in encoder)
    fwd_dec = sum(f for m, f, _ in layers if id(m) not in encoder)
    first = layers[0][1]
    macs = fwd_enc + fwd_dec + (2 * fwd_dec + 2 * fwd_enc - first) + (2 * fwd_enc - first)
    return 2 * macs * batch_size


def benchmark_profile(args):
    """``--profile``: where the default step's time goes, phase by phase (the phases of
    objectives.nonsyn_original, timed one after the other), the profiler's split of convolution
    forward and backward, and the step's convolution FLOPs against this machine's measured
    peak for the same convolutions."""
    from torch.profiler import ProfilerActivity, profile

    from synergy import synergy_penalty
    bf16 = args.precision == "bf16"
    with tempfile.TemporaryDirectory() as tmp:
        solver = Solver(Config(grid="reduced", batch_size=args.batch_size, cuda=args.cuda,
                               alpha=5.0, omega=0.9, precision=args.precision), tmp)
        c, device = solver.config, solver.device
        for _ in range(5):
            solver.advance()
        phases = {}

        def timed(name, work):
            seconds, out = _clock(device, work)
            phases.setdefault(name, []).append(seconds)
            return out
        for _ in range(args.rounds * args.steps):  # the steps of nonsyn_original, phase by phase
            x = timed("data: the batch's indices, unpacked to floats",
                      lambda: solver.batches.train(solver.step))
            with solver.autocast():
                logits, mu, logvar, _ = timed("forward: encoder + decoder",
                                              lambda: solver.model(x))
            loss = timed("losses: recon + KL", lambda: solver.reconstruction_loss(logits, x)
                         + kl_loss(mu, logvar))
            solver.optim.zero_grad()
            timed("backward of recon + KL (both networks)",
                  lambda: loss.backward(retain_graph=True))
            timed("optimiser: 0.4.1 Adam (two steps)", solver.optim.step)
            syn, best = timed("greedy policy + synergy penalty",
                              lambda: synergy_penalty(mu, logvar, c.omega, c.alpha))
            solver.optim.zero_grad()
            timed("backward of the synergy (the extra encoder pass)", syn.backward)
            timed("optimiser: 0.4.1 Adam (two steps)", solver.optim.step)
            solver.step += 1
        per_step = {name: sum(t) / (args.rounds * args.steps) for name, t in phases.items()}
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                solver.advance()
        ops = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
        conv_fwd = sum(v for k, v in ops.items() if k in ("aten::_convolution",
                                                            "aten::mkldnn_convolution",
                                                            "aten::cudnn_convolution"))
        conv_bwd = sum(v for k, v in ops.items() if "convolution_backward" in k)
        total_prof = sum(ops.values())
        # the same convolutions alone (forward, warm cache): this machine's rate for them
        layers = conv_layers(solver.model.cpu())
        solver.model.to(device)
        rates = []
        for layer, macs, shape in layers:
            x = torch.rand(args.batch_size, *shape[1:], device=device)
            x = x.to(memory_format=torch.channels_last)
            with torch.no_grad(), solver.autocast():
                _clock(device, lambda: layer(x), 3)  # warm-up
                rates.append(2 * macs * args.batch_size * 10
                             / _clock(device, lambda: layer(x), 10)[0])
        a = torch.rand(2048, 2048, device=device, dtype=torch.bfloat16 if bf16 else None)
        _clock(device, lambda: a @ a)  # warm-up
        gemm = 5 * 2 * 2048 ** 3 / _clock(device, lambda: a @ a, 5)[0]
    step = sum(per_step.values())
    flops = step_flops(solver.model, args.batch_size)
    print(f"device {device}, batch {args.batch_size}, threads {torch.get_num_threads()}; default "
          f"step in {args.precision}, {args.rounds * args.steps} steps timed phase by phase")
    for name, t in sorted(per_step.items(), key=lambda kv: -kv[1]):
        print(f"  {name:50s} {t * 1e3:7.2f} ms  {t / step:6.1%}")
    print(f"  {'all phases':50s} {step * 1e3:7.2f} ms")
    print(f"profiler, {args.steps} steps of Solver.advance: convolution forward "
          f"{conv_fwd / total_prof:.1%}, convolution backward {conv_bwd / total_prof:.1%} of the "
          f"CPU time")
    print(f"convolution FLOPs per step {flops / 1e9:.2f} GFLOP -> {flops / step / 1e9:.1f} "
          f"GFLOP/s over the whole step")
    print(f"the same convolutions alone (forward, warm cache): {min(rates) / 1e9:.1f}-"
          f"{max(rates) / 1e9:.1f} GFLOP/s (mean {statistics.mean(rates) / 1e9:.1f}); "
          f"{args.precision} GEMM 2048^3: {gemm / 1e9:.1f} GFLOP/s")
    return dict(phases=per_step, flops=flops, conv_rates=rates, gemm=gemm)


def trained_for(args, memory_format=None):
    """The representation --metrics times: a run's checkpoint, or a fresh model."""
    if args.run:
        trained = Trained.load(RunFolder(args.run), cuda=args.cuda)
    else:
        trained = Trained.build(Config(grid=args.grid, cuda=args.cuda))
    if memory_format is not None:
        trained.model.to(memory_format=memory_format)
    return trained


def timed_encoding(trained, precision="fp32"):
    """(seconds, codes) of one encoding pass over the grid."""
    return _clock(trained.device,
                  lambda: encode_all(trained.model, trained.data, precision))


def metrics_worker(args):
    """``--baseline-worker --metrics``: the encoding pass as 7adde97 ran it (NCHW, glibc's
    default malloc), once per line on stdin (a path to save the codes to); answers seconds."""
    _glibc_default_malloc()
    trained = trained_for(args, torch.contiguous_format)
    print("ready", flush=True)
    for line in sys.stdin:
        seconds, codes = timed_encoding(trained)
        np.save(line.strip(), codes)
        print(json.dumps(seconds), flush=True)


def score_all(codes, sizes):
    """{metric: (score, seconds)} of every metric with its default protocol."""
    represent, scores = lookup(codes, sizes), {}
    for i, name in enumerate(METRIC_NAMES):
        start = time.perf_counter()
        result = METRICS[name](represent, sizes, np.random.default_rng([0, i]), **PROTOCOLS[name])
        scores[name] = (result["score"], time.perf_counter() - start)
    return scores


def benchmark_metrics(args):
    """The encoding pass (default fp32, bf16 where native, and as 7adde97 ran it, interleaved
    over --rounds), the ground-truth plot, and every metric on the fp32 and bf16 codes."""
    rounds = args.rounds if args.rounds_given else 1
    flags = ["--baseline-worker", "--metrics", "--grid", args.grid,
             *(["--run", args.run] if args.run else []), *(["--cuda"] if args.cuda else []),
             *(["--threads", str(args.threads)] if args.threads else [])]
    # the worker makes its data first (it is ready once it has), then this process
    with _workers(flags) as (baseline,), tempfile.TemporaryDirectory() as tmp:
        trained = trained_for(args)
        precisions = ["fp32"] + (["bf16"] if native_bf16(trained.device) else [])
        times, codes = {}, {}
        for _ in range(rounds):
            for p in precisions:
                seconds, codes[p] = timed_encoding(trained, p)
                times.setdefault(p, []).append(seconds)
            _send(baseline, f"{tmp}/codes.npy")
            times.setdefault("7adde97", []).append(_answer(baseline))
            codes["7adde97"] = np.load(f"{tmp}/codes.npy")
        sizes, config = trained.data.factor_sizes, trained.config
        start = time.perf_counter()
        summary = grid_summary(codes["fp32"], trained.data, config.z_dim)
        save_ground_truth_plot(summary, f"{tmp}/gt.png", f"{config.metric}")
        plot_seconds = time.perf_counter() - start
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"device {trained.device}, {trained.config.grid} grid ({len(codes['fp32'])} images), "
          f"threads {torch.get_num_threads()}, {'run ' + args.run if args.run else 'fresh model'}"
          f"; median of {rounds} interleaved round(s)")
    print("encoding pass:")
    for name, label in (("fp32", "fp32 (default)"), ("bf16", "bf16"), ("7adde97", "as 7adde97")):
        if name in median:
            with_plot = (median["7adde97"] + plot_seconds) / (median[name] + plot_seconds)
            print(f"  {label:16s} {median[name]:7.1f} s   {median['7adde97'] / median[name]:5.2f}x "
                  f"vs 7adde97; with the ground-truth plot {median[name] + plot_seconds:7.1f} s "
                  f"({with_plot:5.2f}x)")
    print(f"  ground-truth plot (means + figure) {plot_seconds:.1f} s; fp32 codes vs 7adde97's: "
          f"max |difference| {np.abs(codes['fp32'] - codes['7adde97']).max():.1e}")
    scores = {name: score_all(c, sizes) for name, c in codes.items()}
    print("metrics (default protocols): " + " | ".join(f"{n} codes" for n in scores))
    for metric in METRIC_NAMES:
        cells = [f"{scores[n][metric][0]:.4f} ({scores[n][metric][1]:.1f} s)" for n in scores]
        line = f"  {metric:12s} " + " | ".join(cells)
        if "bf16" in scores:
            line += f"   bf16 - fp32 {scores['bf16'][metric][0] - scores['fp32'][metric][0]:+.4f}"
        same = scores["fp32"][metric][0] == scores["7adde97"][metric][0]
        print(line + f"   fp32 {'==' if same else '!='} 7adde97")
    return dict(times=median, plot=plot_seconds, scores=scores)


ROOT = Path(__file__).resolve().parent
DEVICE_TARGETS = dict(one_trial=2000, packed=(8, 6.0))  # steps/s of one trial; K, x one trial


def packed_worker(args):
    """``--packed-worker``: one trial's Solver (default update, reduced grid), warmed up; on a
    line from stdin it trains ``--steps`` steps and answers the seconds they took."""
    with tempfile.TemporaryDirectory() as tmp:
        solver = Solver(Config(grid="reduced", batch_size=args.batch_size, cuda=args.cuda,
                               alpha=5.0, omega=0.9, precision=args.precision), tmp)
        for _ in range(20):
            solver.advance()
        _sync(solver.device)
        print("ready", flush=True)
        sys.stdin.readline()
        print(json.dumps(_clock(solver.device, solver.advance, args.steps)[0]), flush=True)


def packed_throughput(args, k, precision="fp32"):
    """Total steps/s of ``k`` trials trained side by side, one process each (as study.py
    --trials-per-gpu k places them on one GPU), timed from a common start to the last finish."""
    flags = ["--packed-worker", "--steps", str(args.steps), "--batch_size", str(args.batch_size),
             "--precision", precision, *(["--cuda"] if args.cuda else [])]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with _workers(flags, k, env) as trials:
        start = time.perf_counter()
        for trial in trials:  # all started before any answer is read
            _send(trial, "go")
        for trial in trials:
            _answer(trial)
        return k * args.steps / (time.perf_counter() - start)


def benchmark_device(args):
    """``--device-check``: the GPU tests, steps/s of one trial and of K packed trials, and the
    full-grid encoding, in one command (a few minutes on one GPU). Without CUDA it runs on the
    CPU, as a check of the command itself."""
    started = time.perf_counter()
    cuda = args.cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(0) if cuda else "no CUDA device: the CPU (a smoke run)"
    print(f"device check: {name}; torch {torch.__version__}")
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "--tb=line", "-p",
                            "no:cacheprovider", "tests/test_gpu.py"], cwd=ROOT,
                           capture_output=True, text=True)
    lines = tests.stdout.strip().splitlines() or ["(no output)"]
    print(f"GPU tests (tests/test_gpu.py): {lines[-1]}")
    if tests.returncode not in (0, 5):  # each failure's name and the line that failed
        print("\n".join(line for line in lines if line.startswith(("FAILED", "ERROR", "/", "E "))
                         or ".py:" in line))
    results = {"tests": tests.returncode}
    precisions = ["fp32"] + (["bf16"] if native_bf16(device) else [])
    for precision in precisions:
        one = packed_throughput(args, 1, precision)
        results[f"one trial {precision}"] = one
        target = f" (target >= {DEVICE_TARGETS['one_trial']})" if precision == "fp32" else ""
        print(f"one trial, {precision}, default update, batch {args.batch_size}: "
              f"{one:7.0f} steps/s{target}")
    for k in args.packs:
        total = packed_throughput(args, k)
        results[f"packed {k}"] = total
        print(f"{k:2d} packed trials, fp32: {total:7.0f} steps/s in total = "
              f"{total / results['one trial fp32']:4.1f}x one trial")
    k, factor = DEVICE_TARGETS["packed"]
    if f"packed {k}" in results:
        print(f"  target: {k} packed trials >= {factor}x one trial")
    print("CUDA graphs: not attempted (the original update's Adam step counts are host numbers; "
          "see docs/benchmarks.md)")
    trained = Trained.build(Config(grid=args.grid, cuda=cuda))
    for precision in precisions:
        seconds, codes = timed_encoding(trained, precision)
        results[f"encoding {precision}"] = seconds
        print(f"encoding pass, {args.grid} grid ({len(codes)} images), {precision}: "
              f"{seconds:6.1f} s")
    print(f"device check took {time.perf_counter() - started:.0f} s")
    return results


STUDY_FLAGS = ["--grid", "reduced", "--eval-metrics", "none", "--gt-interval", "1000000",
               "--save-interval", "1000000", "--nb-test", "2"]


def _timed(command, threads=None):
    """Wall-clock seconds of ``command`` (a python script and its flags), run to its end."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    subprocess.run([sys.executable, *command], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def benchmark_study(args):
    cores, n = usable_cpus(), args.trials
    with tempfile.TemporaryDirectory() as tmp:
        def flags(steps):
            return STUDY_FLAGS + ["--steps", str(steps), "--log-interval", str(steps)]

        def study(name, seeds, steps, *placement):
            return _timed(["study.py", "--out", f"{tmp}/{name}", "--metric", "Test_gt", "--seed",
                           *map(str, seeds), *placement, "--", *flags(steps)])
        # Overhead: short trials, so that the training's own noise does not hide it; plain and
        # study interleaved round by round.
        overheads = []
        for r in range(args.rounds):
            plain = sum(_timed(["run.py", *flags(args.overhead_steps), "--seed", str(seed),
                                "--output_dir", tmp, "--run-name", f"plain{r}_{seed}"], threads=1)
                        for seed in range(1, n + 1))
            one = study(f"one{r}", range(1, n + 1), args.overhead_steps, "--workers", "1",
                        "--threads", "1")
            overheads.append((one - plain) / n)
            print(f"round {r + 1}: {n} trials x {args.overhead_steps} steps, 1 thread each: "
                  f"back-to-back run.py {plain:.1f} s, study.py --workers 1 {one:.1f} s: "
                  f"{overheads[-1]:+.2f} s per trial")
        overhead = statistics.median(overheads)
        print(f"study overhead per trial (median of {args.rounds} rounds): {overhead:+.2f} s")
        steps, seeds = args.trial_steps, range(1, cores + 1)
        wide = study("wide", seeds, steps)  # the default: one trial per core, one thread each
        deep = study("deep", seeds, steps, "--workers", "1", "--threads", str(cores))
        single = _timed(["run.py", *flags(steps), "--output_dir", tmp, "--run-name", "single"],
                        threads=cores)
    print(f"{cores} cores, {cores} trials x {steps} steps (wall-clock, start-up included):")
    print(f"  study.py default ({cores} workers x 1 thread) {wide:6.1f} s  "
          f"{cores * steps / wide:6.1f} steps/s in total")
    print(f"  study.py 1 worker x {cores} threads        {deep:6.1f} s  "
          f"{cores * steps / deep:6.1f} steps/s in total")
    print(f"  one plain run.py, {cores} threads (1 trial)  {single:6.1f} s  "
          f"{steps / single:6.1f} steps/s")
    return dict(overhead=overhead, wide=wide, deep=deep, single=single)


if __name__ == "__main__":
    main()
