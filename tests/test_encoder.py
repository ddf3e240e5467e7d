"""Scoring any encoder (evaluate.py --encoder, representation.score): what the scores say about
codes, their invariances, a run's own model scored as the run scored itself, and bad encoders
named in one line."""
import json
import textwrap

import pytest
import torch

import evaluate
from conftest import run_cli
from representation import EncoderError, score

METRICS = ["factor_vae", "mig"]


def position_scale(x):
    """Codes read off the image: the sprite's centre of mass (x, y) and its area (scale)."""
    m = x[:, 0]
    mass = m.sum((1, 2)).clamp_min(1e-6)
    xs, ys = torch.arange(64.0).view(1, 1, 64), torch.arange(64.0).view(1, 64, 1)
    return torch.stack([(m * xs).sum((1, 2)) / mass, (m * ys).sum((1, 2)) / mass, mass.sqrt()], 1)


@pytest.fixture(scope="module")
def reference():
    return {k: v["score"] for k, v in score(position_scale, grid="reduced", metrics=METRICS).items()}


def test_codes_that_read_position_and_scale_score_clearly_above_noise(reference):
    generator = torch.Generator().manual_seed(0)
    noise = score(lambda x: torch.randn(len(x), 3, generator=generator), grid="reduced",
                  metrics=METRICS)
    assert reference["factor_vae"] > noise["factor_vae"]["score"] + 0.3
    assert reference["mig"] > noise["mig"]["score"] + 0.4


@pytest.mark.parametrize("change", ["reordered", "a constant code added"])
def test_reordering_codes_or_adding_a_constant_one_changes_no_score(reference, change):
    if change == "reordered":
        encode = lambda x: position_scale(x)[:, [2, 0, 1]]  # noqa: E731
    else:
        encode = lambda x: torch.cat([position_scale(x), torch.full((len(x), 1), 7.0)], 1)  # noqa: E731
    scores = score(encode, grid="reduced", metrics=METRICS)
    assert {k: v["score"] for k, v in scores.items()} == reference


def test_an_array_a_mean_logvar_tuple_and_a_tensor_are_the_same_codes(reference):
    as_array = score(lambda x: position_scale(x).numpy(), grid="reduced", metrics=METRICS)
    as_tuple = score(lambda x: (position_scale(x), torch.zeros(len(x), 3)), grid="reduced",
                     metrics=METRICS)
    assert {k: v["score"] for k, v in as_array.items()} == reference
    assert {k: v["score"] for k, v in as_tuple.items()} == reference


@pytest.mark.parametrize("body, message", [
    ("return x.mean((2, 3))[:, :, None]", "returned shape (256, 1, 1) for a batch of 256 images; "
                                          "expected (256, d)"),
    ("return x.mean((2, 3))[:-1]", "returned shape (255, 1) for a batch of 256 images"),
    ("c = x.mean((2, 3)); c[3, 0] = float('nan'); return c",
     "returned a non-finite code (nan) for image 3, dimension 0"),
    ("raise ValueError('the weights are not loaded\\nsecond line')",
     "the encoder raised ValueError: second line (bad.py:4)"),
    ("return 'codes'", "returned a str, not codes: give a tensor or array of shape (256, d)"),
    ("return 3.0", "returned a float, not codes"),
])
def test_a_bad_encoder_is_one_line_naming_the_problem(tmp_path, capsys, body, message):
    (tmp_path / "bad.py").write_text(f"import torch\n\ndef encode(x):\n    {body}\n")
    json_path = tmp_path / "s.json"
    assert evaluate.main(["--encoder", f"{tmp_path / 'bad.py'}:encode", "--grid", "reduced",
                          "--json", str(json_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not json_path.exists()


def test_a_missing_file_name_or_module_error_is_one_line(tmp_path, capsys):
    (tmp_path / "enc.py").write_text("def encode(x):\n    return x\n\ndef other(x):\n    pass\n")
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    for argv, message in (
            ([f"{tmp_path / 'nothere.py'}:encode"], "no such file"),
            ([f"{tmp_path / 'enc.py'}:encoder"], "has no function encoder (it defines encode, "
                                                  "other)"),
            ([f"{tmp_path / 'enc.py'}"], "give FILE.py:FUNCTION"),
            ([f"{tmp_path / 'broken.py'}:encode"], "raised ModuleNotFoundError: No module named "
                                                   "'no_such_module_here'"),
            ([f"{tmp_path / 'none.pt'}"], "no such file")):
        assert evaluate.main(["--encoder", *argv, "--grid", "reduced"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    with pytest.raises(EncoderError, match="returned a NoneType"):
        score(lambda x: None, grid="reduced")
    with pytest.raises(SystemExit):  # a run folder and an encoder: one of them
        evaluate.main([str(tmp_path), "--encoder", f"{tmp_path / 'enc.py'}:encode"])
    assert "one of them" in capsys.readouterr().err


def test_a_torchscript_module_is_scored_and_json_holds_scores_protocols_versions(
        tmp_path, reference, capsys):
    class PositionScale(torch.nn.Module):
        def forward(self, x):
            return position_scale(x)
    torch.jit.save(torch.jit.script(PositionScale()), tmp_path / "model.pt")
    assert evaluate.main(["--encoder", str(tmp_path / "model.pt"), "--grid", "reduced",
                          "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "TorchScript model.pt on dsprites (reduced grid): factor_vae" in out
    saved = json.loads((tmp_path / "s.json").read_text())
    assert {k: saved[k] for k in METRICS} == reference
    assert saved["results"]["factor_vae"]["protocol"]["num_train"] == 10000
    assert {"torch", "numpy", "scikit-learn"} <= set(saved["versions"])
    assert saved["data"]["grid"] == "reduced" and saved["eval_seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "s.json"]


@pytest.mark.slow  # trains a run, then scores it twice
def test_a_runs_own_model_through_the_encoder_api_scores_as_the_run_did(tmp_path, capsys):
    code, run_dir = run_cli(tmp_path, "run", "--eval-metrics", "factor_vae,mig")
    assert code == 0
    (tmp_path / "wrap.py").write_text(textwrap.dedent(f"""
        from representation import Trained
        trained = Trained.load({str(run_dir)!r}, cuda=False)
        trained.model.eval()

        def encode(x):
            return trained.model.encoder(x)[0]
        """))
    assert evaluate.main(["--encoder", f"{tmp_path / 'wrap.py'}:encode", "--grid", "reduced",
                          "--json", str(tmp_path / "s.json")]) == 0
    own = json.loads((run_dir / "metrics.json").read_text())["evaluations"][-1]["scores"]
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["factor_vae"] == own["factor_vae"]["score"]
    assert saved["mig"] == own["mig"]["score"]
