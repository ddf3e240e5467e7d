"""A checkpoint that passes its checksum (anyone can recompute it) is still checked field by
field before a resume or an evaluation touches any file: either the resume works, or it exits 2
with one line and every file of the run folder is byte-identical."""
import contextlib
import hashlib
import io
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evaluate
from conftest import TINY, no_data
from run import main
from runfolder import RunFolder, tensor_checksum

QUICK = [*TINY, "--eval-sample", "50"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """{metric: a finished 4-step run folder}, never modified (copied per case)."""
    root = tmp_path_factory.mktemp("pristine")
    runs = {}
    for metric in ("Test_gt", "Factor"):
        assert main([*QUICK, "--metric", metric, "--steps", "4", "--output_dir", str(root),
                     "--run-name", metric, "--data-dir", str(no_data(root))]) == 0
        runs[metric] = root / metric
    return runs


def fingerprint(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def resign(folder, checkpoint):
    """Save ``checkpoint`` into ``folder`` with a valid checksum, as a forger would."""
    checkpoint.pop("checksum", None)
    checkpoint["checksum"] = tensor_checksum(checkpoint)
    torch.save(checkpoint, Path(folder) / "checkpoints/last.pt")


def resume(folder, steps=5):
    """(exit code, stderr) of ``run.py --resume folder --steps N`` in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--resume", str(folder), "--steps", str(steps)])
    return code, err.getvalue()


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


def load(folder):
    return torch.load(Path(folder) / "checkpoints/last.pt", weights_only=True)


def first_param(state):
    return next(iter(state))


EDITS = {  # name: (metric, edit of the loaded checkpoint, the field the message names)
    "negative step": ("Test_gt", lambda c: c.update(step=-5), "step must lie in [0"),
    "fractional step": ("Test_gt", lambda c: c.update(step=2.5), "step must be a finite whole"),
    "step past the run": ("Test_gt", lambda c: c.update(step=10**9), "step must lie in [0, 4]"),
    "NaN elapsed": ("Test_gt", lambda c: c.update(elapsed=math.nan), "elapsed must be a finite"),
    "text eval_pending": ("Test_gt", lambda c: c.update(eval_pending="yes"),
                          "eval_pending must be True or False"),
    "negative best_counts": ("Test_gt", lambda c: c["best_counts"].fill_(-1),
                             "best_counts must be whole numbers"),
    "best_counts shape": ("Test_gt", lambda c: c.update(best_counts=torch.zeros(3)),
                          "best_counts must be a torch.float32 tensor of shape (10,)"),
    "weight shape": ("Test_gt", lambda c: c["model"].update(
        {first_param(c["model"]): torch.zeros(2, 2)}), "model[encoder."),
    "weight dtype": ("Test_gt", lambda c: c["model"].update(
        {k: v.double() for k, v in c["model"].items()}), "torch.float32 tensor"),
    "NaN weight": ("Test_gt", lambda c: c["model"][first_param(c["model"])].fill_(math.nan),
                   "holds NaN or infinite values"),
    "extra weight": ("Test_gt", lambda c: c["model"].update(extra=torch.zeros(1)),
                     "model must hold the tensors"),
    "optimiser lr": ("Test_gt", lambda c: c["optim"]["param_groups"][0].update(lr=1.0),
                     "optim.param_groups[0].lr must be 0.0001"),
    "moment shape": ("Test_gt", lambda c: c["optim"]["state"][0].update(exp_avg=torch.zeros(1)),
                     "optim.state[0].exp_avg must be"),
    "negative second moment": ("Test_gt", lambda c: c["optim"]["state"][0]["exp_avg_sq"].fill_(-1),
                               "optim.state[0].exp_avg_sq holds negative values"),
    "Adam step of 0.4.1 as text": ("Test_gt", lambda c: c["optim"]["state"][0].update(step="8"),
                                   "optim.state[0].step must be a finite whole number"),
    "discriminator missing": ("Factor", lambda c: c.pop("D"), "missing D"),
    "discriminator step": ("Factor", lambda c: c["optim_D"]["state"][0].update(
        step=torch.tensor(-3.0)), "optim_D.state[0].step must lie in [1"),
    "RNG state": ("Test_gt", lambda c: c["rng"].update(torch=torch.zeros(7, dtype=torch.uint8)),
                  "rng.torch is not a generator state torch accepts"),
    "RNG dtype": ("Test_gt", lambda c: c["rng"].update(torch=torch.zeros(5056)),
                  "rng.torch must be a 1-d uint8 tensor"),
    "extra entry": ("Test_gt", lambda c: c.update(colour="red"), "unknown entries colour"),
    "z_dim of 10**9": ("Test_gt", lambda c: c["config"].update(z_dim=10**9),
                       "z_dim must be <= 1024"),
}


@pytest.mark.parametrize("name", EDITS)
def test_a_resigned_checkpoint_with_a_bad_field_changes_no_file(pristine, tmp_path, name):
    metric, edit, message = EDITS[name]
    folder = tmp_path / "run"
    shutil.copytree(pristine[metric], folder)
    checkpoint = load(folder)
    edit(checkpoint)
    resign(folder, checkpoint)
    before = fingerprint(folder)
    code, err = resume(folder)
    assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err, err
    assert message in error_lines(err)[0], err
    assert fingerprint(folder) == before  # metrics.jsonl, config.json, every file
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert evaluate.main([str(folder), "--no-cuda", "--eval-metrics", "none"]) == 2
    assert message in err.getvalue() and fingerprint(folder) == before


# --- the property: mutate any field in any way -------------------------------------------------

def leaves(value, path=()):
    """Every path into a checkpoint's nested dicts and lists (the containers too; a tuple is
    one value)."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from leaves(item, (*path, i))


def replacements(original):
    """Values that may stand where ``original`` stood."""
    plain = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True,
                                                             allow_infinity=True),
                      st.text(max_size=4), st.none(), st.booleans(), st.just([]), st.just({}),
                      st.lists(st.integers(-3, 3), max_size=3))
    if not isinstance(original, torch.Tensor):
        return plain
    return st.one_of(plain, st.sampled_from([
        original.double(), original.to(torch.int64), original.flatten()[:1].clone(),
        torch.zeros(*original.shape, 2), torch.full_like(original.float(), math.nan),
        torch.full_like(original.float(), -1.0), torch.full_like(original.float(), math.inf),
        original.float() * 2]))


def parent_of(checkpoint, path):
    node = checkpoint
    for key in path[:-1]:
        node = node[key]
    return node


@pytest.mark.slow  # up to 25 resumed runs
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_any_mutation_either_resumes_or_exits_2_with_one_line_and_no_file_changed(pristine,
                                                                                    data):
    metric = data.draw(st.sampled_from(["Test_gt", "Factor"]), label="run")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "run"
        shutil.copytree(pristine[metric], folder)
        checkpoint = load(folder)
        checkpoint.pop("checksum", None)
        paths = [p for p in leaves(checkpoint) if p]
        path = data.draw(st.sampled_from(paths), label="field")
        parent = parent_of(checkpoint, path)
        how = data.draw(st.sampled_from(["replace", "delete", "add a key"]), label="how")
        if how == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif how == "add a key" and isinstance(parent, dict):
            parent[data.draw(st.sampled_from(["extra", "0", 7]), label="key")] = 1
        else:
            parent[path[-1]] = data.draw(replacements(parent[path[-1]]), label="value")
        resign(folder, checkpoint)
        before = fingerprint(folder)
        code, err = resume(folder)
        assert "Traceback" not in err
        if code == 0:
            assert RunFolder(folder).load_checkpoint()["step"] == 5
        else:
            assert code == 2 and len(error_lines(err)) == 1, err
            assert fingerprint(folder) == before
