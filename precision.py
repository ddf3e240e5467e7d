"""Arithmetic precision of the networks (``--precision``): fp32, the default and the only
replay-exact one, or bf16 autocast where the hardware runs it natively.

With bf16 the convolutions and linear layers run under ``torch.autocast`` (forward; their
backward follows the dtypes autocast chose), while the weights, Adam's moments, the losses, the
per-latent KLs, the greedy policy and the synergy penalty stay in fp32: the networks hand back
fp32 outputs (model.py), and everything after them is computed from those.
"""
import contextlib
import functools
import logging
import platform
from pathlib import Path

import torch

from utils import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
# CPU flags (Linux /proc/cpuinfo) of native bf16 arithmetic: AVX512-BF16 and AMX on x86, the
# Armv8.6 BF16 extension on aarch64. Elsewhere bf16 is emulated and slower than fp32.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@functools.cache
def cpu_flags():
    """The CPU's feature flags (empty where /proc/cpuinfo does not say), read once."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


@functools.cache
def cpu_model():
    """The CPU's model name ("model name" in /proc/cpuinfo, else the platform's word)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_record(config, device):
    """What config.json says of the machine a run trained on: the device asked for (--no-cuda
    or not) and the one used, its model, torch's threads and the precision."""
    used = torch.device(device)
    return dict(requested="cuda" if config.cuda else "cpu", used=str(used),
                model=torch.cuda.get_device_name(used) if used.type == "cuda" else cpu_model(),
                cpu=cpu_model(), torch_threads=torch.get_num_threads(),
                precision=config.precision)


def native_bf16(device):
    """Whether ``device`` computes bf16 natively (a CUDA GPU with bf16, or a CPU flag above)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def check_precision(precision, device):
    """Refuse a precision ``device`` cannot run well: one line naming the flag and what to do."""
    if precision != "bf16":
        return
    if not native_bf16(device):
        where = ("this GPU has none" if torch.device(device).type == "cuda" else
                 "this CPU has no AVX512-BF16 or AMX (nor Arm BF16)")
        raise ConfigError(f"--precision bf16 needs native bf16 arithmetic, and {where}: there it "
                          f"would be emulated, slower than fp32. Use --precision fp32 (the "
                          f"default), or run on a CPU or GPU with bf16")
    if torch.device(device).type == "cpu" and "amx_bf16" not in cpu_flags():
        _warn_bf16_without_amx()


@functools.cache  # once per process
def _warn_bf16_without_amx():
    log.warning("--precision bf16 on a CPU with AVX512-BF16 but no AMX: there oneDNN's bf16 "
                "convolutions measured slower than fp32 (docs/benchmarks.md); fp32 is the faster "
                "choice on this CPU")


def config_device(config):
    """The device ``config`` asks for: CUDA when it allows it and there is one, else the CPU."""
    return torch.device("cuda" if config.cuda and torch.cuda.is_available() else "cpu")


def pick_device(config):
    """The device ``config`` trains on, chosen once per start; refuses a precision that device
    cannot run well. On CUDA, fp32 work is made true fp32 (``ieee_fp32_on_cuda``)."""
    device = config_device(config)
    check_precision(config.precision, device)
    if device.type == "cuda":
        ieee_fp32_on_cuda()
    return device


def ieee_fp32_on_cuda():
    """Turn off TensorFloat-32 for this process: PyTorch lets cuDNN's fp32 convolutions round
    their inputs to TF32 (10-bit mantissa) by default, which moved the original trainer's replay
    by 1.4e-3 in KL within 20 steps on an H200 (docs/benchmarks.md). fp32 here means fp32 on
    every device; under bf16 autocast the layers are bf16 either way."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def stored_run_precision(config, given, tool):
    """The precision ``tool`` (evaluate.py, figures.py) scores or draws a stored run at:
    ``given`` (its --precision), else the run's own. A bf16 run on a device without native bf16
    is refused, one line, with the flag that scores it in fp32 here: emulated, bf16 would take
    hours over the full grid."""
    device = config_device(config)
    if given is None and config.precision == "bf16" and not native_bf16(device):
        where = ("this GPU has none" if device.type == "cuda" else
                 "this CPU has no AVX512-BF16 or AMX (nor Arm BF16)")
        raise ConfigError(f"the run was trained in bf16, and {where}: emulated, its pass over "
                          f"the full grid would take hours. Add --precision fp32 to {tool} to "
                          f"do it in fp32 here (numbers may differ from its bf16 ones in the "
                          f"last digits), or run on a CPU or GPU with bf16")
    precision = given or config.precision
    check_precision(precision, device)
    return precision


def autocast(device, precision):
    """A fresh context manager for the networks' forward passes at ``precision``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
