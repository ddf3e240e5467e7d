"""The run folder: its file names, the checkpoint (format, checksum, every field checked
against what this code writes), config.json, metrics.jsonl and metrics.json, stored runs and
stored weights, and the two sequences run.py drives: start a run and resume a run. study.py,
evaluate.py and figures.py read run folders only through this module."""
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import torch

from config import (CHECKPOINT_FORMAT, IMPLIED_SETTINGS, RESUMABLE, Config, file_stem, flag_of)
from dataset import FACTOR_NAMES, DatasetError, data_identity
from model import MODEL_SPECS, Discriminator
from objectives import OBJECTIVES, Adam041, discriminator_optimiser, vae_optimiser
from precision import device_record, pick_device
from utils import (ConfigError, DiskFull, Diverged, atomic_torch_save, atomic_write_bytes,
                   check_writable, disk_full_named, git_commit, load_tensors, package_versions,
                   write_json)

log = logging.getLogger(__name__)


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


def _read_json(path, missing, advice):
    """The JSON in ``path`` (``missing`` where there is no such file); ConfigError (one line,
    ending with ``advice``) where it cannot be read."""
    if not path.exists():
        return missing
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not readable ({type(err).__name__}: {err}); it was "
                          f"damaged or edited. {advice}") from None


class RunFolder:
    """Owner of one run folder: its file names, the checkpoint (with its format version), the
    metrics log and the evaluation report. Nothing else builds a path inside a run folder.

    Files: ``config.json`` (settings, data source, versions, resumes), ``metrics.jsonl`` (one
    record per log interval, ``"kind": "train"``, and per evaluation, ``"kind": "eval"``),
    ``metrics.json`` (evaluations with their protocols, appended), ``checkpoints/last.pt``,
    ``<stem>_traversal_<step>.png`` and ``<stem>_gt_<step>.png`` / ``.npz`` (``config.file_stem``:
    ``alpha_5.0`` for Non-Syn VAE as the original named them, ``Factor_gamma6.4``, ``VAE``, ...).
    """

    CONFIG = "config.json"
    LOG = "metrics.jsonl"
    REPORT = "metrics.json"
    CHECKPOINT = "checkpoints/last.pt"
    WEIGHTS = "model.pt"  # a run's final weights alone (figures.py writes misc/runs/<run>/)
    IMPORTED = "imported.json"  # where a study took a run finished elsewhere from (study.py)
    RECORDS = (CONFIG, LOG, REPORT)  # the run's small text records
    _NUMBERED = re.compile(r".+_(traversal|gt)_(\d+)\.(png|npz)")

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
        anything of a run (see ``holds_nothing``: reused), or left records but no checkpoint
        and no process holds it (kept as ``<name>.failed-<time>``, and the run starts anew: a
        folder that can be neither resumed nor restarted would be a dead end); a generated
        ``default_name`` gets a numeric suffix instead."""
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
            folder = cls(path)
            if path.is_dir() and folder.holds_nothing():
                log.info("Reusing %s: an earlier start left it without a checkpoint or outputs",
                         path)
                return folder
            if path.is_dir() and not path.is_symlink() and not folder.checkpoint_path.exists() \
                    and (path / cls.CONFIG).is_file() and folder.lock_holder() is None:
                kept = folder.set_aside("failed")  # a start that failed before its first save
                log.warning("%s stopped before its first checkpoint; it is kept as %s and the "
                            "run starts anew", path, kept)
            else:
                raise ConfigError(f"run folder {path} already exists and is never overwritten; "
                                  f"use --resume {path} to continue it, or another --run-name")
        try:
            path.mkdir()
            (path / ".write-test").touch()
            (path / ".write-test").unlink()
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"no space left on device while creating the run folder {path}; "
                               f"nothing was trained. Free some space, then start the run "
                               f"again", path) from None
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
        """Delete the temporary files that a killed atomic write left behind (``.NAME.*.tmp``,
        in the folder and in checkpoints/); called when no other process writes here: with the
        writer lock held (every save and resume) or by evaluate.py when no run holds it."""
        for folder in (self.path, self.checkpoint_path.parent):
            if folder.is_dir():
                for orphan in folder.glob(".*.tmp"):
                    if orphan.is_file() and not orphan.is_symlink():
                        orphan.unlink(missing_ok=True)

    # --- files named by step --------------------------------------------------------------------

    def traversal_path(self, config, step):
        return self.path / f"{file_stem(config)}_traversal_{step}.png"

    def gt_plot_path(self, config, step):
        return self.path / f"{file_stem(config)}_gt_{step}.png"

    def gt_summary_path(self, config, step):
        return self.path / f"{file_stem(config)}_gt_{step}.npz"

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

    @property
    def weights_path(self):
        return self.path / self.WEIGHTS

    def has_config(self):
        return (self.path / self.CONFIG).is_file()

    def is_complete(self):
        """True when the folder holds a run that trained all its steps (its checkpoint at the
        last step, no evaluation left to redo), or, without a checkpoint, the records and final
        weights of such a run as figures.py exports them (``holds_finished_export``)."""
        if not self.checkpoint_path.is_file():
            return self.holds_finished_export()
        try:
            checkpoint = self.load_checkpoint()
        except ConfigError:
            return False  # a resume names the problem
        return (checkpoint["step"] >= checkpoint["config"]["steps"]
                and not checkpoint.get("eval_pending"))

    def holds_finished_export(self):
        """True when the folder holds, without a checkpoint, a finished run as figures.py exports
        it (misc/runs/<run>): config.json, the final weights (``WEIGHTS``, bound to that
        config.json and intact) at its last step, and metrics.jsonl with the training record of
        that step and, for data with factors, the evaluation of that step."""
        if self.checkpoint_path.is_file() or not self.weights_path.is_file():
            return False
        try:
            saved, config = stored_weights(self)
            records = self.records()
            factors = self.read_config().get("factors")
        except ConfigError:
            return False
        final = saved["step"]
        logged = {(r["kind"], r["step"]) for r in records}
        return (final >= config.steps and ("train", final) in logged
                and (not factors or ("eval", final) in logged))

    def kept_checkpoint_path(self, step):
        return self.checkpoint_path.parent / f"step_{step}.pt"

    def kept_steps(self):
        """The steps of the checkpoints kept beside the latest (``--keep-interval``)."""
        found = (p.stem.removeprefix("step_") for p in
                 self.checkpoint_path.parent.glob("step_*.pt") if p.is_file())
        return sorted(int(s) for s in found if s.isdigit())

    def save_checkpoint(self, state, keep=False):
        """Write ``state`` (tensors and plain values) atomically, tagged with its format and
        the checksum of its tensors; with ``keep``, also as the kept checkpoint of its step."""
        self.checkpoint_path.parent.mkdir(exist_ok=True)
        self.remove_orphans()
        state = dict(state, format=CHECKPOINT_FORMAT)
        paths = [self.checkpoint_path] + ([self.kept_checkpoint_path(state["step"])] if keep
                                          else [])
        atomic_torch_save(dict(state, checksum=tensor_checksum(state)), *paths)

    def load_checkpoint(self, step=None):
        """The run's checkpoint (tensors and plain values only), or the one kept at ``step``:
        readable, of a known format, its tensors matching their checksum. Format 1 is read with
        its implied settings."""
        path = self.checkpoint_path if step is None else self.kept_checkpoint_path(step)
        if step is not None and not path.is_file():
            kept = self.kept_steps()
            raise ConfigError(f"{self.path} kept no checkpoint at step {step} ("
                              + (f"kept steps: {', '.join(map(str, kept))}" if kept else
                                 "it kept none: train with --keep-interval N to keep some")
                              + ")")
        if not path.is_file():
            raise ConfigError(f"{self.path}: no checkpoint at {path}")
        checkpoint = load_tensors(path, "checkpoint")
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
        if found not in (*IMPLIED_SETTINGS, CHECKPOINT_FORMAT) or isinstance(found, bool):
            raise ConfigError(f"{path} has checkpoint format {found!r}; this version of the code "
                              f"reads formats 1 to {CHECKPOINT_FORMAT}. Use the code the run was "
                              f"trained with (config.json records its git commit)")
        config = checkpoint.get("config")
        if not isinstance(config, dict):
            raise ConfigError(f"{path} holds no run settings ('config'); the file was edited or "
                              f"written by other code. Nothing was changed")
        if found in IMPLIED_SETTINGS:
            checkpoint["config"] = {**IMPLIED_SETTINGS[found], **config}
        if found != 1:  # format 1 had no checksum
            stored = checkpoint.pop("checksum", None)
            if stored != tensor_checksum(checkpoint):
                raise ConfigError(f"{path}: the checksum of its tensors does not match the one "
                                  f"stored in it; the file is corrupt. Nothing was changed")
        return checkpoint

    def copy_resumable(self, target, scrub=lambda text: text):
        """Copy this stopped run into the new folder ``target`` so that ``run.py --resume
        target`` continues it on another machine exactly as it would have here: config.json,
        metrics.jsonl (its records), metrics.json, the numbered traversals and ground-truth
        plots and summaries, and the checkpoints (the latest and the kept ones), each validated
        first. ``scrub`` rewrites the text of the records (figures.py: absolute paths to
        ``<path>``); the checkpoints' string settings get the same rewrite, so that they still
        match config.json, and are saved again with their checksum: tensors, RNG states and
        every number are copied as they are; --data-dir is unset (the data is searched for
        where the copy resumes, as run.py does without it). Returns the checkpoint's step."""
        target = Path(target)
        checkpoints = [(step, self.load_checkpoint(step)) for step in [None, *self.kept_steps()]]
        record = self.read_config()
        record["config"]["data_dir"] = None  # searched for where it resumes, as run.py does
        target.mkdir(parents=True)
        copy = RunFolder(target)
        (target / self.CONFIG).write_text(scrub(json.dumps(record, indent=2, sort_keys=True)
                                                + "\n"))
        with open(target / self.LOG, "w") as log_copy:
            for _, line in self.record_lines():
                log_copy.write(scrub(line))
        if (self.path / self.REPORT).is_file():
            text = json.dumps(dict(evaluations=self.evaluations()), indent=2, sort_keys=True)
            (target / self.REPORT).write_text(scrub(text + "\n"))
        for _, path in self.traversals() + self.gt_plots() + self.gt_summaries():
            shutil.copyfile(path, target / path.name)
        copy.checkpoint_path.parent.mkdir()
        for step, checkpoint in checkpoints:
            checkpoint["config"] = {k: scrub(v) if isinstance(v, str) else v
                                    for k, v in checkpoint["config"].items()}
            checkpoint["config"]["data_dir"] = None
            atomic_torch_save(dict(checkpoint, checksum=tensor_checksum(checkpoint)),
                              copy.checkpoint_path if step is None else
                              copy.kept_checkpoint_path(step))
        return checkpoints[0][1]["step"]

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
            if holder := self.lock_holder():
                raise ConfigError(f"{self.path} is training now (PID {holder}) and has no "
                                  f"checkpoint yet: its first comes at its first save interval; "
                                  f"wait for it, or stop that run first")
            raise ConfigError(f"{self.path} has no checkpoint yet ({self.CHECKPOINT}): the run "
                              f"stopped before its first save. Start it again with the same "
                              f"command: the folder is then kept as {self.path.name}"
                              f".failed-<time>")
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
            try:
                os.ftruncate(handle.fileno(), 0)  # unbuffered: nothing left for close()
                os.pwrite(handle.fileno(), f"{os.getpid()}\n".encode(), 0)
            except OSError as err:
                if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise DiskFull(f"no space left on device while writing {self.path / '.lock'} "
                               f"(the run's lock, before anything else); nothing was changed. "
                               f"Free some space, then run the same command again",
                               self.path / ".lock") from None
            yield
        finally:
            handle.close()

    # --- config.json ------------------------------------------------------------------------------

    def write_config(self, metadata):
        write_json(self.path / self.CONFIG, metadata)

    def read_config(self):
        """config.json's record ({} where there is none yet); ConfigError (one line) where it
        is not a readable JSON object with the settings under "config"."""
        path = self.path / self.CONFIG
        advice = "Restore it from a copy: the run's checkpoint holds its settings too"
        record = _read_json(path, {}, advice)
        if not isinstance(record, dict) or not isinstance(record.get("config", {}), dict):
            raise ConfigError(f"{path} is not a run's record (a JSON object with the settings "
                              f"under \"config\"); it was damaged or edited. {advice}")
        return record

    def started_settings(self):
        """The settings config.json records for the run's start, completed with the values
        runs had before a setting existed (IMPLIED_SETTINGS[1]); None without any."""
        started = self.read_config().get("config")
        return None if started is None else {**IMPLIED_SETTINGS[1], **started}

    def settings(self):
        """The run's settings now: those of its start (as ``started_settings``) with each
        resumption's changes (``record_resume``: e.g. --steps raised) applied in order; None
        before config.json holds any."""
        record = self.read_config()
        if not record.get("config"):
            return None
        settings = {**IMPLIED_SETTINGS[1], **record["config"]}
        for resume in record.get("resumes", []):
            if isinstance(resume, dict) and isinstance(resume.get("changed"), dict):
                settings.update(resume["changed"])
        return settings

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

    def last_logged_step(self):
        """The last training step in metrics.jsonl (0 without one), read from the file's tail:
        cheap enough to poll while the run trains."""
        path = self.path / self.LOG
        try:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 4096))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return 0
        for line in reversed(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("kind") == "train":
                return record["step"]
        return 0

    def records(self, kind=None):
        """metrics.jsonl records in order, all or only those of ``kind`` ("train" / "eval"),
        read as a stream (see ``record_lines``)."""
        return [r for r, _ in self.record_lines() if kind is None or r["kind"] == kind]

    def record_lines(self):
        """(record, line) of each of metrics.jsonl's records, read a line at a time in bounded
        memory. A line that is not a record (a JSON object with a known "kind" and a whole
        "step", its numbers finite and below ``VALUE_LIMIT``; at most ``RECORD_LIMIT``
        characters) is left out, with one warning per file naming the first such lines: a
        torn last line (a write cut short), or a file damaged or edited."""
        path = self.path / self.LOG
        if not path.exists():
            return []
        found, bad = [], []
        with open(path, encoding="utf-8", errors="replace") as handle:
            for number in itertools.count(1):
                line = handle.readline(RECORD_LIMIT + 1)
                if not line:
                    break
                if len(line) > RECORD_LIMIT and not line.endswith("\n"):
                    length = len(line) + _skip_line(handle)
                    bad.append(f"line {number}: {length:,} characters, not a record")
                    continue
                record, problem = _record(line)
                if problem:
                    bad.append(f"line {number}: {problem}")
                else:
                    found.append((record, line if line.endswith("\n") else line + "\n"))
        if bad:
            log.warning("%s: %d line(s) are not records and are ignored (%s%s)", path,
                        len(bad), "; ".join(bad[:3]), "; ..." if len(bad) > 3 else "")
        return found

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
        """The evaluations appended to metrics.json so far; ConfigError (one line) where it is
        not a readable JSON object holding a list of them."""
        path = self.path / self.REPORT
        report = _read_json(path, {"evaluations": []}, f"Move it aside (its evaluations are "
                            f"also in {self.LOG}'s eval records) and run again")
        if not isinstance(report, dict) or not isinstance(report.get("evaluations"), list) or \
                not all(isinstance(e, dict) for e in report["evaluations"]):
            raise ConfigError(f"{path} is not a run's report (a JSON object with a list of "
                              f"evaluations); it was damaged or edited. Move it aside and run "
                              f"again")
        return report["evaluations"]

    def last_evaluated(self, part, step=None):
        """``part`` ("scores" or "measures") of the evaluations in metrics.json at ``step``, or
        by default at the latest step evaluated (evaluate.py may score a kept earlier step after
        the final one), or {}: runs evaluated before the sample measures existed have scores
        only. Measures: the last appended at that step; scores: each metric's last appended at
        that step (``evaluate.py --eval-metrics dci`` adds DCI beside the final FactorVAE
        score and MIG)."""
        found = [e for e in self.evaluations() if e.get(part)
                 and (step is None or e.get("step") == step)]
        if not found:
            return {}
        step = max(_step_of(e) for e in found)
        at_step = [e[part] for e in found if _step_of(e) == step]
        if part != "scores":
            return at_step[-1]
        return {name: score for scores in at_step for name, score in scores.items()}

    def append_evaluation(self, evaluation):
        write_json(self.path / self.REPORT,
                   {"evaluations": self.evaluations() + [evaluation]})


RECORD_LIMIT = 1 << 20  # characters of a metrics.jsonl line; a record takes a few hundred
VALUE_LIMIT = 1e100  # a logged loss or score beyond this is not one (a damaged or edited file)
RECORD_KINDS = ("train", "eval")


def _skip_line(handle):
    """Read past the rest of an overlong line, a chunk at a time; returns its length."""
    skipped = 0
    while chunk := handle.readline(RECORD_LIMIT):
        skipped += len(chunk)
        if chunk.endswith("\n"):
            break
    return skipped


def _record(line):
    """(record, None) for a metrics.jsonl line this code writes, else (None, what is wrong)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None, "not JSON" + ("" if line.endswith("\n") else " (torn: a write cut short)")
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not a record"
    if record.get("kind") not in RECORD_KINDS:
        return None, f"kind {record.get('kind')!r} is none of {', '.join(RECORD_KINDS)}"
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None, f"step {step!r} is not a whole number of steps"
    for name, value in _numbers(record):
        if abs(value) > VALUE_LIMIT or not math.isfinite(value):
            return None, f"{name} is {value!r}"
    return record, None


def _numbers(value, name="record"):
    if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
        yield name, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, key)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item, name)


def _step_of(evaluation):
    step = evaluation.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else -1


# --- a stored run: every field checked before anything is built on it ------------------------------

class _Bad(Exception):
    """A checkpoint field that is not what this code writes (the message names it)."""


def _number(value, name, whole=False, low=0, high=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            whole and not isinstance(value, int)) or not math.isfinite(value):
        raise _Bad(f"{name} must be a finite {'whole ' if whole else ''}number, got {value!r}")
    if value < low or (high is not None and value > high):
        raise _Bad(f"{name} must lie in [{low}, {high if high is not None else 'inf'}], got "
                   f"{value!r}")


def _tensor(value, name, shape, dtype=torch.float32, finite=True):
    if not isinstance(value, torch.Tensor):
        raise _Bad(f"{name} must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
        raise _Bad(f"{name} must be a {dtype} tensor of shape {tuple(shape)}, got "
                   f"{value.dtype} {tuple(value.shape)}")
    if finite and value.is_floating_point() and not value.isfinite().all():
        raise _Bad(f"{name} holds NaN or infinite values")


def _state_dict(stored, template, name):
    if not isinstance(stored, dict) or set(stored) != set(template):
        found = sorted(map(str, stored)) if isinstance(stored, dict) else type(stored).__name__
        raise _Bad(f"{name} must hold the tensors {sorted(template)[:3]}..., got {found}"[:300])
    for key, tensor in template.items():
        _tensor(stored[key], f"{name}[{key}]", tensor.shape, tensor.dtype)


def _optimiser(stored, optimiser, name):
    """An optimiser's state dict against a fresh ``optimiser`` of the same parameters: the same
    groups and settings, and per parameter its step and moments of the parameter's shape."""
    template = optimiser.state_dict()
    if not isinstance(stored, dict) or set(stored) != {"state", "param_groups"}:
        raise _Bad(f"{name} must hold 'state' and 'param_groups'")
    groups, fresh = stored["param_groups"], template["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(fresh):
        raise _Bad(f"{name}.param_groups must be a list of {len(fresh)} group(s)")
    for i, (group, want) in enumerate(zip(groups, fresh, strict=True)):
        if not isinstance(group, dict):
            raise _Bad(f"{name}.param_groups[{i}] must be a dict")
        for key in ("params", "lr", "betas", "eps"):
            value, wanted = group.get(key), want[key]
            as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
            if as_list(value) != as_list(wanted):
                raise _Bad(f"{name}.param_groups[{i}].{key} must be {want[key]!r} (the run's "
                           f"settings), got {group.get(key)!r}")
    params = [p for group in optimiser.param_groups for p in group["params"]]
    state = stored["state"]
    if not isinstance(state, dict) or not set(state) <= set(range(len(params))):
        raise _Bad(f"{name}.state must map parameter indices 0..{len(params) - 1} to their "
                   f"state")
    adam041 = isinstance(optimiser, Adam041)
    for index, entry in state.items():
        where = f"{name}.state[{index}]"
        if not isinstance(entry, dict) or set(entry) != {"step", "exp_avg", "exp_avg_sq"}:
            raise _Bad(f"{where} must hold step, exp_avg and exp_avg_sq")
        if adam041:
            _number(entry["step"], f"{where}.step", whole=True, low=1)
        else:
            _tensor(entry["step"], f"{where}.step", ())
            _number(entry["step"].item(), f"{where}.step", low=1)
        shape = params[index].shape
        _tensor(entry["exp_avg"], f"{where}.exp_avg", shape)
        _tensor(entry["exp_avg_sq"], f"{where}.exp_avg_sq", shape)
        if (entry["exp_avg_sq"] < 0).any():
            raise _Bad(f"{where}.exp_avg_sq holds negative values")


def check_checkpoint(checkpoint, config):
    """Every stored field of a training checkpoint against what this code writes for
    ``config``: types, ranges, the tensors' shapes and dtypes against the networks ``config``
    builds, the optimisers' settings, the RNG state. Raises ConfigError naming the first field
    that is not, before anything is built on it or any file is touched."""
    required = {"step", "elapsed", "config", "model", "optim", "best_counts", "rng", "format"}
    optional = {"eval_pending"}  # format 1 had none
    if OBJECTIVES[config.metric].discriminator:
        required |= {"D", "optim_D"}
    try:
        if missing := sorted(required - set(checkpoint)):
            raise _Bad(f"missing {', '.join(missing)}")
        if unknown := sorted(map(str, set(checkpoint) - required - optional)):
            raise _Bad(f"unknown entries {', '.join(unknown)} (not written by this code)")
        _number(checkpoint["step"], "step", whole=True, high=config.steps)
        _number(checkpoint["elapsed"], "elapsed")
        if not isinstance(checkpoint.get("eval_pending", False), bool):
            raise _Bad(f"eval_pending must be True or False, got {checkpoint['eval_pending']!r}")
        with torch.device("cpu"):
            model = MODEL_SPECS[config.dataset].build(config.z_dim, config.arch)
            _state_dict(checkpoint["model"], model.state_dict(), "model")
            _optimiser(checkpoint["optim"], vae_optimiser(model, config), "optim")
            if OBJECTIVES[config.metric].discriminator:
                D = Discriminator(config.z_dim)
                _state_dict(checkpoint["D"], D.state_dict(), "D")
                _optimiser(checkpoint["optim_D"], discriminator_optimiser(D, config),
                           "optim_D")
        counts = checkpoint["best_counts"]
        _tensor(counts, "best_counts", (config.z_dim,))
        if (counts < 0).any() or (counts > checkpoint["step"]).any() or (
                counts != counts.round()).any():
            raise _Bad("best_counts must be whole numbers of steps between 0 and the step")
        rng = checkpoint["rng"]
        if not isinstance(rng, dict) or "torch" not in rng or not set(rng) <= {"torch", "cuda"}:
            raise _Bad("rng must hold the 'torch' generator state (and 'cuda' on a GPU)")
        for key, value in rng.items():
            if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or \
                    value.dim() != 1:
                raise _Bad(f"rng.{key} must be a 1-d uint8 tensor")
        try:
            torch.Generator().set_state(rng["torch"])  # a scratch generator: nothing global
        except RuntimeError:
            raise _Bad("rng.torch is not a generator state torch accepts") from None
    except _Bad as err:
        raise ConfigError(f"the checkpoint's {err}; the file was edited or written by other "
                          f"code. Nothing was changed") from None


def stored_run(folder, step=None):
    """(checkpoint, Config) of the run in ``folder``, validated before anything is built or
    written: a readable checkpoint of a known format whose tensors match their checksum, stored
    settings checked like flags, and the same run as config.json describes (settings that a
    resume may change aside)."""
    folder.check_run()
    folder.check_no_links()
    checkpoint = folder.load_checkpoint(step)
    config = Config.from_stored(checkpoint["config"], f"the checkpoint of {folder}")
    try:
        check_checkpoint(checkpoint, config)
    except ConfigError as err:
        raise ConfigError(f"{folder.checkpoint_path}: {err}") from None
    started = folder.started_settings()
    if started is not None:
        differ = sorted(k for k, v in config.to_dict().items()
                        if k not in RESUMABLE and started.get(k) != v)
        if differ:
            raise ConfigError(f"the checkpoint in {folder} does not belong to the run its "
                              f"config.json describes (they differ in {', '.join(differ)}); "
                              f"nothing was changed")
    return checkpoint, config


def stored_weights(folder):
    """({"step", "model", ...}, Config) of a folder that holds a run's config.json and its model
    weights alone (``WEIGHTS``, no checkpoint): what evaluate.py needs to score a run that was
    not trained here. The weights carry their run's settings and a checksum (``export_weights``)
    and must be that config.json's run; the tensors are checked like a checkpoint's model."""
    folder.check_no_links()
    started = folder.started_settings()
    if started is None:
        raise ConfigError(f"{folder} has no {folder.CONFIG} with the run's settings")
    config = Config.from_stored(started, f"{folder}/{folder.CONFIG}")
    path = folder.weights_path
    saved = load_tensors(path, "model weights file")
    try:
        if not isinstance(saved, dict) or set(saved) != {"step", "model", "config", "checksum"}:
            raise _Bad("must hold 'step', 'model', 'config' and 'checksum' (weights written "
                       "before they carried their run's settings: export them again with "
                       "figures.py from the run folder)")
        if saved["checksum"] != tensor_checksum({k: v for k, v in saved.items()
                                                 if k != "checksum"}):
            raise _Bad("the checksum of its tensors does not match the one stored in it; the "
                       "file is corrupt")
        own = Config.from_stored({**IMPLIED_SETTINGS[1], **saved["config"]}, "its settings") \
            if isinstance(saved["config"], dict) else None
        if own is None:
            raise _Bad("holds no run settings")
        differ = sorted(k for k, v in own.to_dict().items() if k not in RESUMABLE
                        and k != "output_dir" and getattr(config, k) != v)
        if differ:
            raise _Bad(f"holds the weights of another run than {folder.CONFIG} describes "
                       f"(they differ in {', '.join(differ)})")
        _number(saved["step"], "step", whole=True, high=own.steps)
        with torch.device("cpu"):
            template = MODEL_SPECS[config.dataset].build(config.z_dim, config.arch)
        _state_dict(saved["model"], template.state_dict(), "model")
    except (_Bad, ConfigError) as err:
        raise ConfigError(f"{path}: {err}; nothing was written") from None
    return saved, config


def run_metadata(config, data, device):
    """What config.json records besides the settings: data source and size, the device asked
    for and used (``precision.device_record``), versions, commit."""
    return dict(config=config.to_dict(), data_source=data.source, n_images=len(data),
                device=device_record(config, device),
                versions=package_versions(), git_commit=git_commit(),
                factors=list(FACTOR_NAMES) if data.has_factors else None)


def stored_model(folder, step=None):
    """({"step", "model", ...}, Config) of the model a folder holds: its training checkpoint
    (or the one kept at ``step``), or, in a folder with config.json and the final weights alone
    (misc/runs/<run>), those."""
    if step is None and not folder.checkpoint_path.is_file() and folder.weights_path.is_file():
        return stored_weights(folder)
    return stored_run(folder, step)


def export_weights(folder, target):
    """Write the final weights alone (``RunFolder.WEIGHTS``, ~2 MB) of ``folder``'s checkpoint
    into the folder ``target``, bound to their run: with its settings and a checksum. The
    settings name no folder of the machine that trained it (an absolute --output_dir becomes
    ``<path>``, --data-dir is unset), as the exported config.json."""
    checkpoint = folder.load_checkpoint()
    config = dict(checkpoint["config"], data_dir=None)
    if Path(config.get("output_dir") or "").is_absolute():
        config["output_dir"] = "<path>"
    weights = dict(step=checkpoint["step"], config=config, model={
        k: v.contiguous() for k, v in checkpoint["model"].items()})
    atomic_torch_save(dict(weights, checksum=tensor_checksum(weights)),
                      Path(target) / RunFolder.WEIGHTS)


# --- the sequences of a start and a resume ---------------------------------------------------------

def resumed_settings(folder, given):
    """(config, checkpoint, changed) of resuming the run in ``folder`` with the settings
    ``given`` now ({name: value}): only RESUMABLE ones may change, and --steps must lie beyond
    the checkpoint unless an evaluation is left to redo. Checked before anything is written."""
    checkpoint, stored = stored_run(folder)
    stored = stored.to_dict()
    changes = {k: v for k, v in given.items() if k in stored}
    fixed = {k: v for k, v in changes.items() if k not in RESUMABLE and v != stored[k]}
    if fixed:
        raise ConfigError(f"--resume keeps the run's settings; cannot change "
                          f"{', '.join(flag_of(k) for k in sorted(fixed))} (only "
                          f"{', '.join(flag_of(k) for k in RESUMABLE)} may change)")
    config = Config(**{**stored, **changes})
    if config.steps <= checkpoint["step"] and not checkpoint.get("eval_pending"):
        raise ConfigError(f"the run in {folder} is already at step {checkpoint['step']}; pass "
                          f"{flag_of('steps')} N with N > {checkpoint['step']} to train further")
    return config, checkpoint, {k: v for k, v in changes.items() if v != stored[k]}


def check_same_data(folder, data):
    """Refuse (ConfigError, one line, nothing written) to resume a run on other data than it
    trained on: the procedural dSprites where it had the official file or the other way round,
    as on another machine (a run carried there, a file in ./datasets that was not there)."""
    trained = data_identity(folder.read_config().get("data_source") or "")
    here = data_identity(data.source)
    if trained and here and trained != here:
        raise ConfigError(f"{folder} trained on {trained}, but the data found here is {here}: "
                          f"resuming would change its data mid-run. Give --data-dir a folder "
                          f"with the data it trained on (an empty folder for the procedural "
                          f"renderer); nothing was changed")


@contextmanager
def resume_run(folder, given, build):
    """Resume the run in ``folder`` with the settings ``given`` now: checks the folder, takes
    its writer lock, checks every stored field and builds the Solver (``build(config, device,
    checkpoint)``) before any file changes, then drops what the checkpoint does not cover (torn
    writes, records after it) and records the resume in config.json. Yields the Solver with the
    lock held."""
    folder.check_run()  # before the lock: a wrong path gets no .lock file
    folder.check_no_links()
    folder.check_writable("--resume")
    with folder.writer_lock():
        folder.evaluations()  # a damaged metrics.json is named now, not after the training
        config, checkpoint, changed = resumed_settings(folder, given)
        device = pick_device(config)  # the stored precision must run here
        solver = build(config, device, checkpoint)
        check_same_data(folder, solver.data)
        folder.remove_orphans()
        folder.trim_log(checkpoint["step"])
        folder.record_resume(checkpoint["step"], changed, device_record(config, device))
        log.info("Resuming %s at step %d of %d", folder, checkpoint["step"], config.steps)
        yield solver


@contextmanager
def start_run(folder, config, device, build):
    """Start a new run in the new ``folder`` (RunFolder.create): takes its writer lock, builds
    the Solver (``build(config, device)``), writes config.json and yields the Solver with the
    lock held. A start refused because another process holds the folder touches nothing of
    it. A start that fails, its lock held, before the run produced anything removes the folder
    so that it does not block its name; a run that diverged before its first checkpoint is
    kept under a new name (its log shows the divergence)."""
    with folder.writer_lock():  # refused while another process holds it: nothing touched
        try:
            solver = build(config, device)
            folder.write_config(run_metadata(config, solver.data, device))
            yield solver
        except (ConfigError, DatasetError, DiskFull, KeyboardInterrupt):
            folder.remove_if_empty()  # this start's own folder, its lock held
            raise
        except Diverged as err:
            if folder.checkpoint_path.exists():
                raise
            folder.remove_if_empty()
            if folder.path.exists():
                kept = folder.set_aside("diverged")
                raise Diverged(f"{err}; nothing to resume, so the run folder was renamed "
                               f"{kept} (its log kept) and the name is free") from None
            raise
