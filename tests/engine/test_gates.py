"""Quality gates: the §6.4 grammar, safe evaluation, readable reasons, report records."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from stackwatch.engine.gates import (
    DEFAULT_RULES,
    GateError,
    evaluate,
    frame_metrics,
    frame_record,
    parse,
    parse_rules,
)
from stackwatch.engine.register import Registration


def _ok(expr: str, **metrics: float) -> bool:
    """True when the 'reject if' expression holds (the gate fails)."""
    v = evaluate([parse(expr)], metrics)
    return not v.accepted


def test_precedence_and_arithmetic() -> None:
    assert _ok("stars < 10 + 2 * 3", stars=15)  # 15 < 16
    assert not _ok("stars < (10 + 2) * 3 - 22", stars=15)  # 15 < 14 false
    assert _ok("stars > 1 or stars < 0 and stars > 100", stars=5)  # and binds tighter
    assert not _ok("(stars > 1 or stars < 0) and stars > 100", stars=5)
    assert _ok("not stars > 10", stars=5)
    assert _ok("not not stars > 1", stars=5)
    assert _ok("-stars < -4", stars=5)
    assert _ok("--stars == 5", stars=5)
    assert _ok("stars / 2 == 2.5", stars=5)
    assert _ok("fwhm_px >= 2.5e0", fwhm_px=2.5)
    assert _ok("fwhm_px != 2", fwhm_px=2.5)
    assert _ok("eccentricity <= .7", eccentricity=0.7)


def test_finite_and_nan_comparisons() -> None:
    assert _ok("not finite(fwhm_px)", fwhm_px=math.nan)
    assert not _ok("not finite(fwhm_px)", fwhm_px=3.0)
    # comparisons with NaN are false: a NaN metric never trips a comparison gate by itself
    assert not _ok("fwhm_px > 4", fwhm_px=math.nan)


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("stars <", "unexpected end"),
        ("foo > 1", "unknown metric 'foo'"),
        ("median(foo) > 1", "unknown metric 'foo'"),
        ("median(stars", "expected ')'"),
        ("stars > 1 1", "unexpected '1'"),
        ('__import__("os").system("true")', "unexpected character"),
        ("stars", "must be a comparison"),
        ("", "empty expression"),
        ("stars > 1 and", "unexpected end"),
        ("median(2) > 1", "unknown metric '2'"),
        ("stars.real > 1", "unexpected character"),
    ],
)
def test_parse_errors_name_the_gate(expr: str, message: str) -> None:
    with pytest.raises(GateError) as exc:
        parse_rules({"my_gate": expr})
    assert "my_gate" in str(exc.value)
    assert message in str(exc.value)


def test_default_rules_parse() -> None:
    gates = parse_rules(DEFAULT_RULES)
    assert [g.name for g in gates] == list(DEFAULT_RULES)
    assert gates[0].metrics == frozenset({"stars"})


def _history(n: int) -> list[dict[str, float]]:
    return [dict(stars=400.0 + i, fwhm_px=3.0, eccentricity=0.2, background=0.1, weight=1.0, scale=1.0) for i in range(n)]


def test_reasons_are_readable() -> None:
    gates = parse_rules(DEFAULT_RULES)
    m = dict(stars=23.0, fwhm_px=3.1, eccentricity=0.81, background=0.1, weight=1.0, scale=1.0,
             reg_rms_px=0.1, matched_fraction=0.9)
    v = evaluate(gates, m, _history(12))
    assert not v.accepted
    assert v.reason == "trailed: eccentricity 0.81 > 0.7"
    reasons = [r.reason for r in v.failed]
    assert "cloud: stars 23 < 0.5*median(stars) = 202.8 (12 frames)" in reasons
    assert [r.name for r in v.failed] == ["trailed", "cloud"]


def test_relative_to_reference_until_five_frames() -> None:
    gates = [parse("stars < 0.5 * median(stars)", name="cloud")]
    ref = dict(stars=300.0)
    v = evaluate(gates, dict(stars=100.0), _history(4), reference=ref)
    assert not v.accepted
    assert v.reason == "cloud: stars 100 < 0.5*median(stars) = 150 (reference)"
    # with 5 accepted frames the night median takes over (402)
    v = evaluate(gates, dict(stars=190.0), _history(5), reference=ref)
    assert not v.accepted and "(5 frames)" in v.reason
    # first frame: no history, no reference -> relative to itself, passes
    assert evaluate(gates, dict(stars=10.0)).accepted


def test_min_max_median() -> None:
    hist = [dict(fwhm_px=v) for v in (2.0, 3.0, 4.0, 5.0, 10.0, 6.0)]
    assert _eval_one("fwhm_px > median(fwhm_px)", 4.6, hist)  # median 4.5
    assert not _eval_one("fwhm_px > max(fwhm_px)", 9.0, hist)
    assert _eval_one("fwhm_px < min(fwhm_px)", 1.0, hist)


def _eval_one(expr: str, value: float, hist: list[dict[str, float]]) -> bool:
    return not evaluate([parse(expr)], dict(fwhm_px=value), hist).accepted


def test_errors_reject_never_silently_pass() -> None:
    v = evaluate([parse("stars > 1 / (stars - stars)", name="div")], dict(stars=5.0))
    assert not v.accepted and "division by zero" in v.reason
    v = evaluate([parse("fwhm_px > median(fwhm_px)", name="blurred")], dict(fwhm_px=3.0),
                 [dict(fwhm_px=math.nan)] * 6)
    assert not v.accepted and "no finite values" in v.reason


def test_gates_on_unmeasured_metrics_are_skipped() -> None:
    gates = parse_rules(DEFAULT_RULES)
    v = evaluate(gates, dict(stars=400.0, fwhm_px=3.0, eccentricity=0.1, background=0.1), _history(6))
    assert v.accepted
    skipped = {r.name for r in v.results if r.explanation.startswith("skipped")}
    assert skipped == {"low_weight", "bad_match", "cloud"}  # cloud uses scale


def test_frame_record_is_json_and_complete() -> None:
    from stackwatch.engine.simulate_sky import render_stars
    from stackwatch.engine.stars import measure

    rng = np.random.default_rng(1)
    img = np.full((200, 240), 500.0, dtype=np.float32)
    render_stars(img, rng.uniform(10, 230, 80), rng.uniform(10, 190, 80), 10 ** rng.uniform(3, 5, 80), fwhm_px=3.0)
    img = rng.poisson(img).astype(np.float32) / 65535.0
    m = measure(img)
    mat = np.array([[1.0, 0.0, 2.5], [0.0, 1.0, -1.25], [0.0, 0.0, 1.0]])
    reg = Registration(True, mat, 0.04, 70, 0.9, "fast", "similarity")
    metrics = frame_metrics(m, reg, scale=1.1, weight=0.8)
    v = evaluate(parse_rules(DEFAULT_RULES), metrics, reference=metrics)
    rec = frame_record("/night/L_0001.fits", m, reg, v, scale=1.1, weight=0.8)
    text = json.dumps(rec, allow_nan=False)  # strict JSON: NaN became null
    back = json.loads(text)
    for key in ("path", "kind", "status", "reason", "stars", "fwhm_px", "fwhm_arcsec", "eccentricity", "hfr",
                "background", "noise", "reg_rms_px", "matched_fraction", "transform", "scale", "weight"):
        assert key in back
    assert back["status"] == "stacked"
    assert back["transform"] == [[1.0, 0.0, 2.5], [0.0, 1.0, -1.25]]
    assert back["fwhm_arcsec"] is None  # no pixel scale given
    assert back["stars"] == m.metrics.stars
    bad = Registration(False, np.eye(3), math.nan, 0, 0.0, "none", "similarity", "no match with reference (different field?)")
    rec = frame_record("x.fits", m, bad, v)
    assert rec["status"] == "rejected" and rec["transform"] is None
    assert rec["reason"].startswith("rejected: no match with reference")
    json.dumps(rec, allow_nan=False)
