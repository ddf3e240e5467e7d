"""Small shared helpers: atomic files, provenance, RNG state, and the owner of a run folder."""
import argparse
import ctypes
import difflib
import errno
import fcntl
import hashlib
import io
import json
import logging
import multiprocessing
import os
import pickle
import platform
import re
import subprocess
import tempfile
import time
import zipfile
from contextlib import contextmanager
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

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


def atomic_torch_save(obj, path):
    """torch.save through atomic_file: a kill mid-write leaves the previous file intact. The
    checkpoint is serialised in memory first (a few MB) so that a full disk fails in a plain
    write (DiskFull naming the file), not inside torch's zip writer (its RuntimeError says
    only "unexpected pos")."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
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
                raise RuntimeError(f"the evaluation process ended without a result (exit code "
                                   f"{process.exitcode})")
        ok, result = receiver.recv()
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receiver.close()
    if not ok:
        raise result
    return result


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


# --- the run folder ------------------------------------------------------------------------------

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
    """argparse whose invalid-choice error suggests the closest valid value:
    ``argument --metric: invalid choice: 'test_gt'; did you mean 'Test_gt'? (choose from ...)``."""

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


CHECKPOINT_FORMAT = 5  # bumped whenever the checkpoint's layout changes
# Settings that older formats did not store, with the values their runs were trained with:
# format 1 (before --arch, --init and the checksum) the 2020 decoder and today's PyTorch
# initialisation; formats 1 and 2 (before --precision) fp32; formats 1 to 3 (before i_max and
# the evaluation sample) the measurement omega and sample size their runs are evaluated with
# now; formats 1 to 4 (before beta-TCVAE, DIP-VAE and AnnealedVAE) those objectives' defaults,
# which no run of theirs used. A config.json that lacks one of these settings was written
# before it existed: it gets the same value (format 1's table).
_BEFORE_FIELD = dict(lambda_od=10.0, lambda_d_factor=10.0, c_max=25.0, c_steps=100_000,
                     c_gamma=1000.0)
_BEFORE_I_MAX = dict(measure_omega=0.9, eval_sample=10_000)
IMPLIED_SETTINGS = {1: dict(arch="2020", init="current", precision="fp32", **_BEFORE_I_MAX,
                            **_BEFORE_FIELD),
                    2: dict(precision="fp32", **_BEFORE_I_MAX, **_BEFORE_FIELD),
                    3: dict(_BEFORE_I_MAX, **_BEFORE_FIELD),
                    4: _BEFORE_FIELD}


def tensor_checksum(state):
    """sha256 of every tensor in a (nested) checkpoint state, with its key path, dtype and
    shape, in a fixed order: any change of a stored number changes it."""
    digest = hashlib.sha256()

    def visit(prefix, value):
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                visit(f"{prefix}/{key}", value[key])
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(f"{prefix}/{i}", item)
        elif isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{prefix}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    visit("", state)
    return digest.hexdigest()


class RunFolder:
    """Owner of one run folder: its file names, the checkpoint (with its format version), the
    metrics log and the evaluation report. Nothing else builds a path inside a run folder.

    Files: ``config.json`` (settings, data source, versions, resumes), ``metrics.jsonl`` (one
    record per log interval, ``"kind": "train"``, and per evaluation, ``"kind": "eval"``),
    ``metrics.json`` (evaluations with their protocols, appended), ``checkpoints/last.pt``,
    ``alpha_<alpha>_traversal_<step>.png`` and ``alpha_<alpha>_gt_<step>.png`` / ``.npz``.
    """

    CONFIG = "config.json"
    LOG = "metrics.jsonl"
    REPORT = "metrics.json"
    CHECKPOINT = "checkpoints/last.pt"
    _NUMBERED = re.compile(r"alpha_.+_(traversal|gt)_(\d+)\.(png|npz)")

    def __init__(self, path):
        self.path = Path(path)

    def __str__(self):
        return str(self.path)

    @property
    def name(self):
        return self.path.name

    @classmethod
    def create(cls, output_dir, run_name, default_name):
        """A new, empty, writable run folder ``output_dir/run_name``. An existing ``run_name``
        is an error (runs are never overwritten) unless a start that failed left it without
        anything of a run (see ``holds_nothing``); a generated ``default_name`` gets a numeric
        suffix instead."""
        parent = Path(output_dir)
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create --output_dir {parent}: {err.strerror or err}; "
                              f"choose a writable folder") from err
        path = parent / (run_name or default_name)
        if run_name is None:
            suffix = 1
            while path.exists():
                suffix += 1
                path = parent / f"{default_name}_{suffix}"
        elif path.exists():
            if path.is_dir() and cls(path).holds_nothing():
                log.info("Reusing %s: an earlier start left it without a checkpoint or outputs",
                         path)
                return cls(path)
            raise ConfigError(f"run folder {path} already exists and is never overwritten; "
                              f"use --resume {path} to continue it, or another --run-name")
        try:
            path.mkdir()
            (path / ".write-test").touch()
            (path / ".write-test").unlink()
        except OSError as err:
            raise ConfigError(f"cannot write the run folder {path}: {err.strerror or err}; "
                              f"choose a writable --output_dir") from err
        return cls(path)

    _BOOKKEEPING = {".lock", CONFIG}  # and an empty metrics.jsonl

    def holds_nothing(self):
        """True when the folder holds nothing a run produced: at most its lock, its config.json
        and an empty checkpoints/ (a start that failed or was stopped before its first step)."""
        for entry in self.path.iterdir():
            if entry.name in self._BOOKKEEPING or (
                    entry.name == self.LOG and entry.is_file() and entry.stat().st_size == 0):
                continue
            if entry.name == Path(self.CHECKPOINT).parent.name and entry.is_dir() and not any(
                    p for p in entry.iterdir() if not p.name.endswith(".tmp")):
                continue
            return False
        return True

    def set_aside(self, why):
        """Rename the folder to ``<name>.<why>-<time>`` (kept, never deleted) so that it no
        longer blocks its name; returns the new path."""
        kept = self.path.with_name(f"{self.path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.path.rename(kept)
        return kept

    def remove_if_empty(self):
        """Remove the folder of a start that failed before producing anything (see
        ``holds_nothing``), so that it does not block its name; anything else stays."""
        if self.path.is_dir() and self.holds_nothing():
            for entry in sorted(self.path.rglob("*"), reverse=True):
                entry.rmdir() if entry.is_dir() else entry.unlink()
            self.path.rmdir()

    def remove_orphans(self):
        """Delete temporary checkpoint files that a killed write left behind (called with the
        writer lock held, at every save and resume)."""
        folder = self.checkpoint_path.parent
        if folder.is_dir():
            for orphan in folder.glob(f".{self.checkpoint_path.name}.*.tmp"):
                orphan.unlink(missing_ok=True)

    # --- files named by step --------------------------------------------------------------------

    def traversal_path(self, alpha, step):
        return self.path / f"alpha_{alpha}_traversal_{step}.png"

    def gt_plot_path(self, alpha, step):
        return self.path / f"alpha_{alpha}_gt_{step}.png"

    def gt_summary_path(self, alpha, step):
        return self.path / f"alpha_{alpha}_gt_{step}.npz"

    def _numbered(self, kind, suffix):
        found = []
        for path in self.path.iterdir():
            match = self._NUMBERED.fullmatch(path.name)
            if match and match.group(1) == kind and match.group(3) == suffix:
                found.append((int(match.group(2)), path))
        return sorted(found)

    def traversals(self):
        """(step, path) of every traversal image, in step order."""
        return self._numbered("traversal", "png")

    def gt_plots(self):
        return self._numbered("gt", "png")

    def gt_summaries(self):
        return self._numbered("gt", "npz")

    # --- the checkpoint ---------------------------------------------------------------------------

    @property
    def checkpoint_path(self):
        return self.path / self.CHECKPOINT

    def save_checkpoint(self, state):
        """Write ``state`` (tensors and plain values) atomically, tagged with its format and
        the checksum of its tensors."""
        self.checkpoint_path.parent.mkdir(exist_ok=True)
        self.remove_orphans()
        state = dict(state, format=CHECKPOINT_FORMAT)
        atomic_torch_save(dict(state, checksum=tensor_checksum(state)), self.checkpoint_path)

    def load_checkpoint(self):
        """The run's checkpoint (tensors and plain values only): readable, of a known format,
        its tensors matching their checksum. Format 1 is read with its implied settings."""
        path = self.checkpoint_path
        if not path.is_file():
            raise ConfigError(f"{self.path}: no checkpoint at {path}")
        checkpoint = load_tensors(path, "checkpoint")
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
        if found not in (*IMPLIED_SETTINGS, CHECKPOINT_FORMAT) or isinstance(found, bool):
            raise ConfigError(f"{path} has checkpoint format {found!r}; this version of the code "
                              f"reads formats 1 to {CHECKPOINT_FORMAT}. Use the code the run was "
                              f"trained with (config.json records its git commit)")
        config = checkpoint.get("config")
        if found in IMPLIED_SETTINGS and isinstance(config, dict):
            checkpoint["config"] = {**IMPLIED_SETTINGS[found], **config}
        if found != 1:  # format 1 had no checksum
            stored = checkpoint.pop("checksum", None)
            if stored != tensor_checksum(checkpoint):
                raise ConfigError(f"{path}: the checksum of its tensors does not match the one "
                                  f"stored in it; the file is corrupt. Nothing was changed")
        return checkpoint

    def check_writable(self, purpose):
        """ConfigError (one line) unless this process can write into the folder (a read-only
        file system, or permissions that forbid it), before anything is computed."""
        check_writable(self.path, purpose)

    def check_no_links(self):
        """ConfigError (one line) if an entry of the run folder (or of checkpoints/) is a
        symbolic link: the run's writes would follow it out of the folder."""
        parts = [self.path, self.checkpoint_path.parent]
        for folder in parts:
            if folder.is_symlink():
                raise ConfigError(f"{folder} is a symbolic link; the run's writes would follow "
                                  f"it out of the run folder. Replace it by a real folder")
            for entry in folder.iterdir() if folder.is_dir() else ():
                if entry.is_symlink():
                    raise ConfigError(f"{entry} is a symbolic link (to {os.readlink(entry)}); "
                                      f"the run's writes would follow it out of {self.path}. "
                                      f"Replace it by the file itself")

    def check_run(self):
        """Raise ConfigError (one line) unless this is a run folder with a checkpoint; a folder
        that holds run folders gets them named, so that the user can pick one."""
        if not self.path.exists():
            raise ConfigError(f"{self.path} does not exist; give a run folder (outputs/<run "
                              f"name>, as printed when the run started)")
        if not self.path.is_dir():
            raise ConfigError(f"{self.path} is a file, not a run folder")
        if self.checkpoint_path.is_file():
            return
        if (self.path / self.CONFIG).is_file():
            raise ConfigError(f"{self.path} has no checkpoint yet ({self.CHECKPOINT}): the run "
                              f"stopped before its first save; start it again")
        runs = sorted(p.name for p in self.path.iterdir() if (p / self.CHECKPOINT).is_file())
        inside = (f"; the run folders inside it: {', '.join(runs[:8])}"
                  f"{f' and {len(runs) - 8} more' if len(runs) > 8 else ''}" if runs
                  else "; it holds no run folders either")
        raise ConfigError(f"{self.path} is not a run folder (no {self.CHECKPOINT}){inside}")

    def lock_holder(self):
        """The PID (text) of the process that trains in this folder now, or None."""
        try:
            handle = open(self.path / ".lock")
        except OSError:
            return None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return handle.read().strip() or "unknown"
            fcntl.flock(handle, fcntl.LOCK_UN)
        return None

    @contextmanager
    def writer_lock(self):
        """Hold the folder's advisory lock while this process trains in it. A second process is
        refused at once with the holder's PID; the lock goes with the process that holds it, so
        a killed run never blocks its own resume."""
        handle = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ConfigError(f"{self.path} is in use by another process (PID {holder}) that "
                              f"trains or resumes it; two writers would mix their steps. Wait "
                              f"for it to end, or stop it first") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
        finally:
            handle.close()

    # --- config.json ------------------------------------------------------------------------------

    def write_config(self, metadata):
        write_json(self.path / self.CONFIG, metadata)

    def read_config(self):
        path = self.path / self.CONFIG
        return json.loads(path.read_text()) if path.exists() else {}

    def record_resume(self, step, changed, device=None):
        """Append one resumption (its step, the settings changed, the device) to config.json."""
        metadata = self.read_config()
        metadata.setdefault("resumes", []).append(
            dict(step=step, changed=changed, device=device,
                 at=datetime.now().isoformat(timespec="seconds")))
        self.write_config(metadata)

    # --- metrics.jsonl and metrics.json -----------------------------------------------------------

    def open_log(self):
        """metrics.jsonl opened for appending records (see ``write_record``; close it with
        ``close_log``)."""
        return open(self.path / self.LOG, "a")

    def close_log(self, log_file):
        """Close metrics.jsonl; a record that a full disk kept in the buffer fails once more
        here, as the same one-line DiskFull (not a second, raw OSError)."""
        with disk_full_named(self.path / self.LOG):
            log_file.close()

    def write_record(self, log_file, kind, record):
        """One metrics.jsonl line: ``{"kind": kind, **record}``, flushed at once."""
        with disk_full_named(self.path / self.LOG):
            log_file.write(json.dumps(dict(kind=kind, **record)) + "\n")
            log_file.flush()

    def _log_lines(self, text=None):
        """metrics.jsonl's complete lines (of ``text``, its content if already read); a torn
        last line (a write cut short by a kill or a full disk) is left out with a warning."""
        path = self.path / self.LOG
        if text is None:
            if not path.exists():
                return []
            text = path.read_text()
        lines = text.splitlines(keepends=True)
        if lines:
            try:
                json.loads(lines[-1])
            except json.JSONDecodeError:
                log.warning("%s: its last line is torn (%d characters, a write cut short); it "
                            "is ignored", path, len(lines[-1]))
                lines = lines[:-1]
        return lines

    def records(self, kind=None):
        """metrics.jsonl records in order, all or only those of ``kind`` ("train" / "eval")."""
        rows = [json.loads(line) for line in self._log_lines()]
        return rows if kind is None else [r for r in rows if r["kind"] == kind]

    def trim_log(self, step):
        """Keep the records up to ``step`` (the checkpoint's): the resumed run rewrites the rest,
        and a torn last line goes too."""
        path = self.path / self.LOG
        if not path.exists():
            return
        text = path.read_text()
        lines = self._log_lines(text)
        kept = [line if line.endswith("\n") else line + "\n" for line in lines
                if json.loads(line)["step"] <= step]
        if len(kept) != len(lines):
            log.warning("%s: %d records after the checkpoint (step %d) will be recomputed",
                        self.LOG, len(lines) - len(kept), step)
        if "".join(kept) != text:
            atomic_write_bytes(path, "".join(kept).encode())

    def evaluations(self):
        """The evaluations appended to metrics.json so far."""
        path = self.path / self.REPORT
        return json.loads(path.read_text())["evaluations"] if path.exists() else []

    def last_evaluated(self, part):
        """``part`` ("scores" or "measures") of the latest evaluation in metrics.json that has
        it, or {}: runs evaluated before the sample measures existed have scores only."""
        found = [e[part] for e in self.evaluations() if e.get(part)]
        return found[-1] if found else {}

    def append_evaluation(self, evaluation):
        write_json(self.path / self.REPORT,
                   {"evaluations": self.evaluations() + [evaluation]})
