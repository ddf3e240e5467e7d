"""The claims table, the scores table and the seeds' figures of evidence.py, on synthetic runs
whose shares and scores are known (the study-folder reading is in tests/test_figures.py)."""
import json
import warnings

import numpy as np
import pytest

import evidence
from dataset import FACTOR_NAMES


def run(objective, seed, rows, values=None, step=50_000, inactive=1, curves=None):
    """A SeedRun whose active latents hold ``rows`` ({factor: share}) plus inactive ones."""
    shares = np.zeros((len(rows) + inactive, len(FACTOR_NAMES)))
    for j, row in enumerate(rows):
        for name, share in row.items():
            shares[j, FACTOR_NAMES.index(name)] = share
    active = np.arange(len(shares)) < len(rows)
    from plotting import CLAIMS
    claims = {key: rule(shares, active) for key, _, rule in CLAIMS}
    metric = {"Non-Syn VAE": "Test_gt", "FactorVAE": "Factor", "VAE": "VAE"}[objective]
    return evidence.SeedRun(f"{metric}_seed{seed}", metric, objective, seed, step, shares,
                            active, claims, values or {}, curves or {})


SEPARATE = ({"posX": 0.9}, {"posY": 0.9}, {"scale": 0.8})
MIXED = ({"posX": 0.57, "posY": 0.4}, {"posX": 0.4, "posY": 0.55}, {"scale": 0.8})


def test_the_claims_table_counts_the_seeds_that_meet_each_rule():
    at = [run("VAE", 2, MIXED, inactive=0), run("Non-Syn VAE", 2, MIXED),
          run("Non-Syn VAE", 3, SEPARATE), run("Non-Syn VAE", 4, MIXED),
          run("FactorVAE", 2, SEPARATE), run("FactorVAE", 3, SEPARATE)]
    longer = [run("Non-Syn VAE", 1, SEPARATE, step=110_000)]
    lines, rows = evidence.claims_table(at, longer, 50_000)
    xy = next(r for r in rows if r["key"] == "xy")
    assert (xy["Non-Syn VAE"]["met"], xy["Non-Syn VAE"]["n"]) == (1, 3)
    assert xy["Non-Syn VAE"]["seeds"] == [3]
    assert (xy["FactorVAE"]["met"], xy["FactorVAE"]["n"]) == (2, 2)
    assert xy["Non-Syn VAE"]["further"] == {"seed 1 at 110,000": True}
    assert lines[0] == ("| claim | Non-Syn VAE: seeds at 50,000 | Non-Syn VAE: seed 1 at 110,000 "
                        "| VAE: seeds at 50,000 | VAE: seed 1 at 110,000 | FactorVAE: seeds at "
                        "50,000 | FactorVAE: seed 1 at 110,000 |")  # Non-Syn VAE first
    assert lines[2].startswith("| x and y learned separately | 1 of 3 | yes | 0 of 1 |  | 2 of 2 |")
    uninformative = next(r for r in rows if r["key"] == "uninformative")
    assert uninformative["VAE"]["met"] == 0 and uninformative["Non-Syn VAE"]["met"] == 3


def test_the_scores_table_is_mean_and_std_with_welch_tests_against_non_syn():
    from scipy.stats import ttest_ind
    nonsyn = [0.60, 0.70, 0.65]
    factor = [0.80, 0.85, 0.90]
    at = ([run("Non-Syn VAE", s, MIXED, {"factor_vae": v, "i_max": 1.0 + s})
           for s, v in zip((2, 3, 4), nonsyn)]
          + [run("FactorVAE", s, SEPARATE, {"factor_vae": v}) for s, v in zip((2, 3, 4), factor)]
          + [run("VAE", s, MIXED, {"factor_vae": v}) for s, v in zip((2, 3), (0.5, 0.6))])
    lines, rows, tests = evidence.scores_table(at, 50_000)
    assert rows[0]["objective"] == "Non-Syn VAE"
    assert rows[0]["factor_vae"]["mean"] == pytest.approx(0.65)
    assert rows[0]["factor_vae"]["std"] == pytest.approx(0.05)
    assert "0.650 ± 0.050 (n=3)" in lines[2]
    (against_factor,) = [t for t in tests if t["b"] == "FactorVAE"]
    assert against_factor["p_value"] == pytest.approx(
        ttest_ind(nonsyn, factor, equal_var=False).pvalue)
    assert against_factor["meaningful"] and against_factor["score"] == "factor_vae"
    (against_vae,) = [t for t in tests if t["b"] == "VAE"]
    assert not against_vae["meaningful"]  # two VAE seeds
    assert any(line.startswith("| Non-Syn VAE | VAE |") and "(3 v 2) *" in line for line in lines)
    assert not any(t["b"] == "Non-Syn VAE" for t in tests)


def test_the_figures_are_written_from_the_runs(tmp_path):
    curve = {"factor_vae": [(5000, 0.5), (10000, 0.6)], "mig": [(5000, 0.1), (10000, 0.2)]}
    at = [run(o, s, SEPARATE if o == "FactorVAE" else MIXED, {"mig": 0.1 * s}, step=10_000,
              curves=curve) for o in ("Non-Syn VAE", "FactorVAE") for s in (2, 3)]
    # a seed the lower row lacks: its panel is blank, the factor names go on the one above;
    # a collapsed run (no active latent) says so instead of drawing an empty image
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evidence.seeds_figure(at + [run("Non-Syn VAE", 4, MIXED, step=10_000),
                                    run("FactorVAE", 5, (), step=10_000, inactive=3)],
                              tmp_path / "seeds.png", 10_000)
    evidence.curves_figure(at, tmp_path / "curves.png", 10_000)
    from PIL import Image
    assert Image.open(tmp_path / "seeds.png").size[0] > 300
    assert Image.open(tmp_path / "curves.png").size[0] > 600
    with pytest.raises(evidence.EvidenceError, match="no run has eval records"):
        evidence.curves_figure([run("VAE", 2, MIXED)], tmp_path / "none.png", 10_000)


def test_a_study_without_study_json_or_runs_at_the_step_is_one_line(tmp_path):
    with pytest.raises(evidence.EvidenceError, match="no readable study.json"):
        evidence.collect(tmp_path, 50_000)
    (tmp_path / "study.json").write_text(json.dumps({"trials": [
        {"name": "VAE_seed1", "state": "pending"}]}))
    with pytest.raises(evidence.EvidenceError, match="no run has reached step 50,000 yet"):
        evidence.collect(tmp_path, 50_000)


def test_wallclock_takes_the_steady_rate_from_the_median_span():
    """A pause stretches one 5,000-step span; the median span leaves it out, ``seconds`` at the
    end keeps it (it is wall-clock since the run's start)."""
    per_span = [100.0, 110.0, 5000.0, 105.0]  # the third span held a 4,900-second pause
    ends = np.cumsum(per_span)
    train = [dict(step=5000 * (k + 1), seconds=float(s)) for k, s in enumerate(ends)]
    train.insert(0, dict(step=100, seconds=2.0))  # not at a span mark: ignored
    evals = [dict(step=5000 * (k + 1), eval_seconds=10.0) for k in range(4)]
    timing = evidence.wallclock(train, evals)
    # the spans between the marks 5,000 ... 20,000: 110, 5,000, 105 -> median 110
    assert timing["spans"] == 3 and timing["span_median"] == 110.0
    assert timing["steps"] == 20_000 and timing["seconds"] == ends[-1]
    assert timing["evaluations"] == 4 and timing["eval_seconds"] == 40.0
    assert timing["steady_hours"] == pytest.approx(110.0 * 4 / 3600)
    assert evidence.wallclock([], []) is None
    two = [dict(step=5000, seconds=50.0), dict(step=10000, seconds=150.0),
           dict(step=15000, seconds=270.0)]
    assert evidence.wallclock(two, [])["span_median"] == 110.0  # an even count: the middle two
