"""The EOPD-versus-OPD efficacy benchmark at toy size: it runs end to end and writes what the docs link to.

The benchmark itself (benchmarks/efficacy/eopd_vs_opd.py --size full) is not a test; this keeps it working. The
real-model setting runs here on the offline tiny pair instead of SmolLM2.
"""

import json
import math
from pathlib import Path

import pytest

from efficacy_modules import efficacy_module as _module


def test_mean_interval_is_the_t_interval_over_seeds():
    common = _module("common")
    stat = common.mean_interval([1.0, 2.0, 3.0])
    # mean 2, sample sd 1, t_{0.975, 2} = 4.303 (tables): half-width 4.303 / sqrt(3)
    assert stat["mean"] == pytest.approx(2.0)
    assert stat["lo"] == pytest.approx(2.0 - 4.303 / math.sqrt(3), abs=1e-9)
    assert stat["hi"] == pytest.approx(2.0 + 4.303 / math.sqrt(3), abs=1e-9)
    assert common.mean_interval([5.0])["lo"] is None  # one seed: no interval
    assert math.isnan(common.mean_interval([1.0, float("nan")])["mean"])  # a diverged seed is not dropped


def test_learning_rate_rule_lowest_mean_ties_to_smaller_never_non_finite():
    rule = _module("eopd_vs_opd").choose_lr
    final = lambda *values: [[{"step": 9, "m": v}] for v in values]  # noqa: E731
    assert rule({"0.001": final(1.0, 3.0), "0.0003": final(2.0, 2.0), "0.003": final(0.5, float("nan"))},
                "m") == "0.0003"  # tie (mean 2.0) → smaller lr; the lowest mean has a NaN seed → excluded
    assert rule({"0.001": final(1.0, 1.0), "0.003": final(0.5, 0.5)}, "m") == "0.003"


def test_eopd_vs_opd_toy_writes_json_markdown_and_plot(tmp_path):
    from trl_sdx.testing import save_tiny_pair  # matplotlib is a dependency: the plot is asserted, never skipped

    student, teacher = save_tiny_pair(tmp_path / "models")
    prefix = tmp_path / "results" / "eopd_efficacy"
    result = _module("eopd_vs_opd").main(["--size", "toy", "--real-teacher", teacher, "--real-student", student,
                                          "--out-prefix", str(prefix)])
    assert result["complete"]
    saved = json.loads(Path(f"{prefix}.json").read_text())
    methods = ["OPD (τ=∞)", "EOPD (τ=0.8)"]
    toy = saved["sizes"]
    for section, metrics, steps in (
        ("synthetic", ["kl_modal", "student_entropy_modal", "coverage_at_k", "kl_all_positions"],
         list(range(0, toy["steps"] + 1, toy["eval_every"]))),
        ("real", ["kl_heldout", "student_entropy_heldout", "kl_gated", "kl_validation"],
         list(range(0, toy["real_steps"] + 1, toy["real_eval_every"]))),
    ):
        part = saved[section]
        assert set(part["chosen_lr"]) == set(methods) and all(part["chosen_lr"].values())
        for method in methods:
            curve = part["curves"][method]
            assert [row["step"] for row in curve] == steps
            for metric in metrics:
                stat = curve[-1][metric]
                assert stat["n"] == len(toy["seeds"]) and math.isfinite(stat["mean"])
                assert stat["lo"] <= stat["mean"] <= stat["hi"]
        assert set(part["difference_eopd_minus_opd"]) >= {metrics[0]}
    check = saved["synthetic"]["teacher_check"]
    assert {"entropy_modal_mean", "share_modal_above_tau", "valid_mass_modal_mean"} <= set(check)
    assert "gate_fraction_heldout" in saved["real"]["teacher_check"]
    markdown = Path(f"{prefix}.md").read_text()
    assert "Pre-registered rule" in markdown and "Status: **complete**" in markdown
    assert "coverage@k (primary)" in markdown and "held-out KL" in markdown
    assert Path(f"{prefix}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
