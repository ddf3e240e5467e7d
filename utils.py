"""Small shared helpers: the errors, atomic files, provenance, RNG state, did-you-mean parsing,
the CPUs this process may use."""
import argparse
import ctypes
import difflib
import errno
import io
import json
import logging
import multiprocessing
import os
import pickle
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

log = logging.getLogger(__name__)


def load_tensors(path, what):
    """A file torch.save wrote (tensors and plain values only, ``weights_only``); ConfigError
    naming ``path`` and ``what`` it should be when it is unreadable, foreign or malicious."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
        raise ConfigError(f"{path} is not a readable {what} of this project "
                          f"({type(err).__name__}: {first[:120]}); it may be truncated "
                          f"or corrupt. Nothing was changed") from None


def check_writable(path, purpose):
    """ConfigError (one line) unless this process may create files in the folder ``path``:
    not on a read-only file system, and allowed by its permissions."""
    path = Path(path)
    try:
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return  # it does not exist (yet): whoever creates it reports that
    if read_only or not os.access(path, os.W_OK | os.X_OK):
        why = "a read-only file system" if read_only else "no write permission"
        raise ConfigError(f"{path} is read-only ({why}); {purpose} writes into it. Make it "
                          f"writable, or copy it somewhere writable first")


class DiskFull(RuntimeError):
    """A write failed for lack of space; the message names the file (``path``)."""

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path


@contextmanager
def disk_full_named(path):
    """Turn ENOSPC / EDQUOT while writing ``path`` into a one-line DiskFull that names it."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left on device while writing {path}; the previous version "
                           f"of the file is kept. Free some space, then resume the run",
                           path) from None
        raise


@contextmanager
def atomic_file(path):
    """Yield a binary file that replaces ``path`` only once fully written and synced; on any
    error (a full disk among them: DiskFull) the previous ``path`` stays as it was and the
    temporary file is removed."""
    path = Path(path)
    with disk_full_named(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data):
    with atomic_file(path) as f:
        f.write(data)


def atomic_torch_save(obj, *paths):
    """torch.save through atomic_file, into each of ``paths``: a kill mid-write leaves the
    previous file intact. The checkpoint is serialised in memory first (a few MB) so that a full
    disk fails in a plain write (DiskFull naming the file), not inside torch's zip writer (its
    RuntimeError says only "unexpected pos")."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    for path in paths:
        atomic_write_bytes(path, buffer.getvalue())


def write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def git_commit():
    """The commit of the code being run, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions():
    """Versions of Python and of the packages a result depends on (None when not installed)."""
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "numpy": np.__version__}
    for name in ("scikit-learn", "visdom", "tqdm", "matplotlib", "pillow"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def run_abandonable(work, should_stop, poll_seconds=0.2):
    """``work()`` in a forked child process, polling ``should_stop()`` meanwhile: returns its
    result, or None after killing the child as soon as ``should_stop()`` turns true (a minute of
    boosted-tree fitting cannot be interrupted from inside). Where fork is not available the
    work runs here, and a stop waits for it."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return work()
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)

    def child():
        try:
            sender.send((True, work()))
        except BaseException as err:  # handed to the parent, raised there
            sender.send((False, err))

    process = context.Process(target=child, name="evaluation")
    process.start()
    sender.close()
    try:
        while not receiver.poll(poll_seconds):
            if should_stop():
                return None
            if not process.is_alive() and not receiver.poll():
                _ended_without_result(process)
        try:
            ok, result = receiver.recv()
        except EOFError:  # the child died: its end of the pipe closed without a result
            process.join()
            _ended_without_result(process)
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receiver.close()
    if not ok:
        raise result
    return result


def _ended_without_result(process):
    if process.exitcode == -signal.SIGKILL:  # the kernel's out-of-memory killer, most likely
        raise out_of_memory("the metrics' worker process (killed by SIGKILL)", MemoryError())
    raise RuntimeError(f"the evaluation process ended without a result (exit code "
                       f"{process.exitcode})")


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_FREED = dict(mmap_threshold=32 << 20, trim_threshold=1 << 30)


def keep_freed_memory():
    """Make glibc's malloc keep freed memory in the process instead of handing it back to the
    kernel, so that a training step's tensors (several MB each, freed at the end of every step)
    reuse warm pages: with glibc's defaults each step of the default update touched ~12,000
    fresh pages (page faults; docs/benchmarks.md). Blocks up to 32 MB come from the heap, and
    up to 1 GB of free heap is kept (the process's memory stays at its peak). Process-wide and
    idempotent; returns whether it took effect (False off glibc, e.g. macOS or musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_FREED["mmap_threshold"])
                and mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED["trim_threshold"]))


def derived_seed(*keys):
    """A 32-bit seed that is a pure function of ``keys`` (e.g. seed, stream, step), for
    generators that must give the same draws whenever they are re-made (resume)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --- command lines and CPUs ----------------------------------------------------------------------

def closest(value, choices):
    """The choice ``value`` was probably meant to be (case aside, or a near spelling), or None."""
    folded = {str(c).lower(): c for c in choices}
    if str(value).lower() in folded:
        return folded[str(value).lower()]
    near = difflib.get_close_matches(str(value).lower(), list(folded), n=1, cutoff=0.6)
    return folded[near[0]] if near else None


def did_you_mean(value, choices):
    """'; did you mean 'Test_gt'?' or '' (for error messages)."""
    match = closest(value, choices)
    return f"; did you mean {match!r}?" if match is not None else ""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line without the usage, pointing to --help: an invalid
    choice suggests the closest valid value (``argument --metric: invalid choice: 'test_gt';
    did you mean 'Test_gt'? (choose from ...)``), an unknown flag the closest flag
    (``unrecognized argument --alpah=5.0; did you mean --alpha?``)."""

    def error(self, message):
        unknown = re.fullmatch(r"unrecognized arguments: (.*)", message, re.S)
        if unknown:
            first = unknown.group(1).split()[0]
            flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            hint = did_you_mean(first.split("=")[0], flags) if first.startswith("-") else ""
            message = f"unrecognized arguments: {unknown.group(1)}{hint}"
        stop = "" if message.endswith(("?", ".")) else "."
        self.exit(2, f"{self.prog}: error: {message}{stop} '{self.prog} --help' lists every "
                     f"flag\n")

    def _check_value(self, action, value):
        if action.choices is not None and value not in action.choices:
            raise argparse.ArgumentError(action, f"invalid choice: {value!r}"
                                         f"{did_you_mean(value, action.choices)} (choose from "
                                         f"{', '.join(map(str, action.choices))})")


def usable_cpus(cgroup_root="/sys/fs/cgroup", proc_cgroup="/proc/self/cgroup"):
    """The CPUs this process may use: its affinity mask (taskset, SLURM, a container's cpuset),
    capped by a cgroup CPU quota where one is set (v2 ``cpu.max`` of its cgroup and every
    ancestor, or v1 ``cpu.cfs_quota_us``), rounded down, at least 1. ``os.cpu_count()`` counts
    the machine's CPUs instead, and oversubscribes under any of those limits."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quotas = [q for q in _cgroup_quotas(Path(cgroup_root), Path(proc_cgroup)) if q > 0]
    if quotas:
        cpus = min(cpus, int(min(quotas)))
    return max(1, cpus)


def _cgroup_quotas(root, proc_cgroup):
    """CPU quotas (in CPUs) that apply to this process, from cgroup v2 or v1 files."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    quotas = []
    for line in lines:
        hierarchy, _, path = line.partition(":")[2].partition(":")
        folders = [root / path.lstrip("/")] if hierarchy == "" else [
            root / name / path.lstrip("/") for name in (hierarchy, "cpu", "cpu,cpuacct")
            if "cpu" in hierarchy.split(",")]
        for folder in dict.fromkeys(folders):  # v1 names its cpu hierarchy in several ways
            for level in (folder, *folder.parents):
                if not level.is_relative_to(root):
                    break
                quotas.append(_read_quota(level, v2=hierarchy == ""))
    return [q for q in quotas if q is not None]


def _read_quota(folder, v2):
    try:
        if v2:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        else:
            quota = (folder / "cpu.cfs_quota_us").read_text().strip()
            period = (folder / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1"):
            return None
        return int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


class ConfigError(ValueError):
    """A setting, a run folder or a checkpoint is unusable; the message says what to do."""


class OutOfMemory(RuntimeError):
    """The metrics ran out of memory (an address-space limit, or the machine's); the message
    names the limit and what to do."""


def memory_failure(err):
    """True when ``err`` is how a process out of memory fails: MemoryError, ENOMEM, or an
    import or allocation that says so (a shared object that cannot be mapped under
    ``ulimit -v``)."""
    text = str(err).lower()
    return isinstance(err, MemoryError) or getattr(err, "errno", None) == errno.ENOMEM or (
        isinstance(err, (ImportError, SystemError, OSError, RuntimeError))
        and any(s in text for s in ("memory", "map segment", "mmap")))


METRICS_ADDRESS_SPACE = 1.5 * 2**30  # measured: a run with its metrics under ulimit -v


def address_space_limit():
    """The process's address-space limit in bytes (``ulimit -v``), or None when unlimited."""
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def out_of_memory(what, err):
    """OutOfMemory for ``what`` failing with ``err``, naming the limit and the ways out."""
    limit = address_space_limit()
    where = (f" under an address-space limit of {limit / 2**30:.2f} GiB (ulimit -v; the "
             f"metrics need about {METRICS_ADDRESS_SPACE / 2**30:.1f} GiB)" if limit else "")
    cause = f"{type(err).__name__}: {str(err)[:160]}" if str(err) else type(err).__name__
    return OutOfMemory(f"{what} ran out of memory{where} ({cause}). Raise the limit or free "
                       f"memory, or leave the metrics out (--eval-metrics none) and score the "
                       f"run later with evaluate.py")


class Diverged(RuntimeError):
    """Training produced a non-finite loss or weight; the message names the step and the term."""


# --- progress ----------------------------------------------------------------------------------------

PROGRESS_PERCENT = 5  # a redirected log gets a progress line each time this share of the total passes


def progress(total, initial=0, desc="", unit="step", file=None, every_s=None):
    """A progress display: tqdm's bar on a terminal; in a redirected log (stderr a file or a
    pipe) ``LineProgress``, a plain line every PROGRESS_PERCENT % (and every ``every_s``
    seconds when given), instead of thousands of carriage-return redraws."""
    stream = file or sys.stderr
    if stream.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream,
                    dynamic_ncols=True, smoothing=0.1)
    return LineProgress(total, initial, desc, unit, stream, every_s)


class LineProgress:
    """The calls of tqdm that this project makes (update, write, set_description, close, as a
    context manager), printing one self-contained line per PROGRESS_PERCENT % of the total:
    ``training: 35% 1,050/3,000 steps, 16.2 step/s, 1:05 elapsed, ~2:00 left``."""

    def __init__(self, total, initial=0, desc="", unit="step", file=None, every_s=None):
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.file, self.every_s = file or sys.stderr, every_s
        self.first, self.started = initial, time.monotonic()
        self.printed, self.printed_at = initial, self.started
        self.step_size = max(1, total * PROGRESS_PERCENT // 100)

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        if (self.n // self.step_size > self.printed // self.step_size or self.n >= self.total
                and self.printed < self.total) or (
                self.every_s is not None and now - self.printed_at >= self.every_s):
            self._line(now)

    def _line(self, now):
        elapsed = now - self.started
        rate = (self.n - self.first) / elapsed if elapsed > 0 else 0.0
        left = (f", ~{tqdm.format_interval((self.total - self.n) / rate)} left"
                if rate > 0 and self.n < self.total else "")
        share = 100 * self.n / self.total if self.total else 100.0
        print(f"{self.desc}: {share:3.0f}% {self.n:,}/{self.total:,} {self.unit}s, "
              f"{rate:.3g} {self.unit}/s, {tqdm.format_interval(elapsed)} elapsed{left}",
              file=self.file, flush=True)
        self.printed, self.printed_at = self.n, now

    def set_description(self, desc, refresh=True):
        self.desc = desc

    def write(self, line, file=None):
        print(line, file=file or self.file, flush=True)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
