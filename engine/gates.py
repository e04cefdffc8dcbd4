"""Quality gates: named "reject if" expressions over frame metrics (algorithms.md §6.4).

Grammar (hand-written recursive descent, no ``eval``; names whitelisted; float numbers)::

    expr := and ("or" and)*          and := not ("and" not)*        not := "not" not | cmp
    cmp  := sum (("<"|"<="|">"|">="|"=="|"!=") sum)?                sum := term (("+"|"-") term)*
    term := unary (("*"|"/") unary)*                                unary := "-" unary | atom
    atom := NUMBER | NAME | ("min"|"max"|"median") "(" NAME ")" | "finite" "(" NAME ")" | "(" expr ")"

A gate *fails* (the frame is rejected) when its expression is true. ``min``/``max``/``median`` run over
the history of accepted frames of the night (same target and filter) passed by the caller; until
``min_history`` (5) frames are accepted they use the reference frame's value instead ("relative to
the reference"); with neither history nor reference (the first frame, which becomes the reference)
they use the frame's own value. Comparisons with NaN are false. Division by zero, or a statistic of a
metric that no frame has, makes the gate report an error, which rejects the frame (never a silent pass).
A gate using a metric that is absent from the frame's metrics mapping (not measured at this stage,
e.g. ``weight`` before normalisation) is skipped and says so: the daemon can evaluate the same gates
after measurement and again after registration/normalisation.

Reasons name the gate and the deciding comparison with its values, e.g.
``cloud: stars 23 < 0.5*median(stars) = 205.0 (12 frames)`` or ``trailed: eccentricity 0.81 > 0.7``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stackwatch.engine.errors import StackwatchError

if TYPE_CHECKING:
    from stackwatch.engine.register import Registration
    from stackwatch.engine.stars import Measurement

__all__ = [
    "DEFAULT_RULES",
    "METRIC_NAMES",
    "Gate",
    "GateError",
    "GateResult",
    "Verdict",
    "evaluate",
    "frame_metrics",
    "frame_record",
    "parse",
    "parse_rules",
]

METRIC_NAMES = frozenset(
    {
        "stars", "fwhm_px", "fwhm_arcsec", "eccentricity", "hfr", "background", "background_rms", "noise",
        "psf_snr", "psf_fits", "saturated_stars", "scale", "scale_err", "weight", "reg_rms_px",
        "matched_fraction", "n_inliers", "exposure_s", "temperature_c", "fwhm_spread_px", "beta", "gradient",
        "altitude_deg", "airmass",
    }
)

DEFAULT_RULES: dict[str, str] = {
    "few_stars": "stars < 15",
    "no_psf": "not finite(fwhm_px)",
    "blurred": "fwhm_px > 1.5 * median(fwhm_px)",
    "trailed": "eccentricity > 0.7 or eccentricity > median(eccentricity) + 0.2",
    "cloud": "stars < 0.5 * median(stars) or scale > 2.0",
    "bright_sky": "background > 2.0 * median(background)",
    "low_weight": "weight < 0.25 * median(weight)",
    # partial overlap is fine (the registration itself refuses another field); §6.4's
    # matched_fraction < 0.3 would reject a frame that shares a third of the reference's field
    "bad_match": "reg_rms_px > 0.5 or n_inliers < 8",
}

_FUNCS = ("min", "max", "median")
_TOKEN = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z_0-9]*)|(?P<op><=|>=|==|!=|[<>()+\-*/]))"
)


class GateError(StackwatchError):
    """A gate expression that cannot be parsed or names an unknown metric."""


# --------------------------------------------------------------------------------------------- AST


@dataclass(frozen=True)
class _Num:
    value: float


@dataclass(frozen=True)
class _Name:
    name: str


@dataclass(frozen=True)
class _Stat:
    func: str
    name: str


@dataclass(frozen=True)
class _Finite:
    name: str


@dataclass(frozen=True)
class _Neg:
    arg: _Node


@dataclass(frozen=True)
class _Bin:
    op: str
    left: _Node
    right: _Node


@dataclass(frozen=True)
class _Cmp:
    op: str
    left: _Node
    right: _Node


@dataclass(frozen=True)
class _Not:
    arg: _Node


@dataclass(frozen=True)
class _Logic:
    op: str  # "and" / "or"
    args: tuple[_Node, ...]


_Node = _Num | _Name | _Stat | _Finite | _Neg | _Bin | _Cmp | _Not | _Logic


def _fmt_num(v: float) -> str:
    if v != v:
        return "nan"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.4g}"


def _src(node: _Node) -> str:
    """Compact source text of an arithmetic node."""
    if isinstance(node, _Num):
        return _fmt_num(node.value)
    if isinstance(node, _Name):
        return node.name
    if isinstance(node, _Stat):
        return f"{node.func}({node.name})"
    if isinstance(node, _Finite):
        return f"finite({node.name})"
    if isinstance(node, _Neg):
        return f"-{_src(node.arg)}"
    if isinstance(node, _Bin):
        return f"{_src(node.left)}{node.op}{_src(node.right)}"
    if isinstance(node, _Cmp):
        return f"{_src(node.left)} {node.op} {_src(node.right)}"
    if isinstance(node, _Not):
        return f"not {_src(node.arg)}"
    return f" {node.op} ".join(_src(a) for a in node.args)


# ------------------------------------------------------------------------------------------ parser


class _Parser:
    def __init__(self, text: str, gate: str) -> None:
        self.gate = gate
        self.text = text
        self.toks: list[tuple[str, str]] = []
        pos = 0
        stripped = text.rstrip()
        while pos < len(stripped):
            m = _TOKEN.match(stripped, pos)
            if m is None or m.end() == pos:
                raise self.error(f"unexpected character {stripped[pos:].strip()[:1]!r} at position {pos}")
            kind = m.lastgroup or ""
            self.toks.append((kind, m.group(kind)))
            pos = m.end()
        self.i = 0

    def error(self, msg: str) -> GateError:
        return GateError(f"gate {self.gate!r}: {msg} in {self.text!r}")

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        t = self.peek()
        if t is None:
            raise self.error("unexpected end of expression")
        self.i += 1
        return t

    def accept(self, value: str) -> bool:
        t = self.peek()
        if t is not None and t[1] == value and t[0] in ("op", "name"):
            self.i += 1
            return True
        return False

    def expect(self, value: str) -> None:
        if not self.accept(value):
            t = self.peek()
            raise self.error(f"expected {value!r}, got {t[1] if t else 'end'!r}")

    def parse(self) -> _Node:
        if not self.toks:
            raise self.error("empty expression")
        node = self.expr()
        if self.peek() is not None:
            raise self.error(f"unexpected {self.peek()[1]!r}")  # type: ignore[index]
        return node

    def expr(self) -> _Node:
        args = [self.and_()]
        while self.accept("or"):
            args.append(self.and_())
        return args[0] if len(args) == 1 else _Logic("or", tuple(args))

    def and_(self) -> _Node:
        args = [self.not_()]
        while self.accept("and"):
            args.append(self.not_())
        return args[0] if len(args) == 1 else _Logic("and", tuple(args))

    def not_(self) -> _Node:
        if self.accept("not"):
            return _Not(self.not_())
        return self.cmp()

    def cmp(self) -> _Node:
        left = self.sum()
        t = self.peek()
        if t is not None and t[0] == "op" and t[1] in ("<", "<=", ">", ">=", "==", "!="):
            self.i += 1
            return _Cmp(t[1], left, self.sum())
        return left

    def sum(self) -> _Node:
        node = self.term()
        while True:
            t = self.peek()
            if t is not None and t[0] == "op" and t[1] in "+-":
                self.i += 1
                node = _Bin(t[1], node, self.term())
            else:
                return node

    def term(self) -> _Node:
        node = self.unary()
        while True:
            t = self.peek()
            if t is not None and t[0] == "op" and t[1] in "*/":
                self.i += 1
                node = _Bin(t[1], node, self.unary())
            else:
                return node

    def unary(self) -> _Node:
        if self.accept("-"):
            return _Neg(self.unary())
        return self.atom()

    def metric(self) -> str:
        kind, val = self.take()
        if kind != "name" or val not in METRIC_NAMES:
            raise self.error(f"unknown metric {val!r} (known: {', '.join(sorted(METRIC_NAMES))})")
        return val

    def atom(self) -> _Node:
        kind, val = self.take()
        if kind == "num":
            return _Num(float(val))
        if kind == "op" and val == "(":
            node = self.expr()
            self.expect(")")
            return node
        if kind == "name":
            if val in _FUNCS or val == "finite":
                self.expect("(")
                name = self.metric()
                self.expect(")")
                return _Finite(name) if val == "finite" else _Stat(val, name)
            if val in ("and", "or", "not"):
                raise self.error(f"unexpected {val!r}")
            if val not in METRIC_NAMES:
                raise self.error(f"unknown metric {val!r} (known: {', '.join(sorted(METRIC_NAMES))})")
            return _Name(val)
        raise self.error(f"unexpected {val!r}")


def _names(node: _Node) -> set[str]:
    if isinstance(node, _Name | _Stat | _Finite):
        return {node.name}
    if isinstance(node, _Neg | _Not):
        return _names(node.arg)
    if isinstance(node, _Bin | _Cmp):
        return _names(node.left) | _names(node.right)
    if isinstance(node, _Logic):
        out: set[str] = set()
        for a in node.args:
            out |= _names(a)
        return out
    return set()


def _is_bool(node: _Node) -> bool:
    return isinstance(node, _Cmp | _Not | _Logic | _Finite)


@dataclass(frozen=True)
class Gate:
    """A parsed gate: its name, source text and syntax tree."""

    name: str
    source: str
    tree: _Node

    @property
    def metrics(self) -> frozenset[str]:
        """The metric names the expression uses."""
        return frozenset(_names(self.tree))


def parse(expr: str, *, name: str = "gate") -> Gate:
    """Parse one "reject if" expression; `GateError` names the gate and the problem."""
    tree = _Parser(str(expr), name).parse()
    if not _is_bool(tree):
        raise GateError(f"gate {name!r}: expression must be a comparison or a logical test, got {expr!r}")
    return Gate(name=name, source=str(expr), tree=tree)


def parse_rules(rules: Mapping[str, str]) -> tuple[Gate, ...]:
    """Parse a mapping gate name -> expression (config ``[gates.rules]``); errors name the gate."""
    return tuple(parse(expr, name=name) for name, expr in rules.items())


# --------------------------------------------------------------------------------------- evaluation


class _EvalError(Exception):
    pass


@dataclass(frozen=True)
class GateResult:
    """One gate's outcome: failed (the frame is rejected by it), the explanation, or an error."""

    name: str
    failed: bool
    explanation: str
    error: str = ""

    @property
    def reason(self) -> str:
        return f"{self.name}: {self.error or self.explanation}"


@dataclass(frozen=True)
class Verdict:
    """Accepted or not, with the first failing gate's reason; ``failed`` lists every failing gate."""

    accepted: bool
    reason: str
    failed: tuple[GateResult, ...]
    results: tuple[GateResult, ...]


class _Ctx:
    def __init__(self, metrics: Mapping[str, float], history: Sequence[Mapping[str, float]],
                 reference: Mapping[str, float] | None, min_history: int) -> None:
        self.metrics = metrics
        self.history = history
        self.reference = reference
        self.min_history = min_history
        self.notes: list[str] = []

    def value(self, name: str) -> float:
        v = self.metrics.get(name)
        return float(v) if v is not None else math.nan

    def stat(self, func: str, name: str) -> float:
        if len(self.history) >= self.min_history:
            vals = [float(h[name]) for h in self.history if h.get(name) is not None and math.isfinite(float(h[name]))]
            if not vals:
                raise _EvalError(f"{func}({name}) over {len(self.history)} frames: no finite values")
            note = f"{len(self.history)} frames"
            vals.sort()
            n = len(vals)
            if func == "min":
                out = vals[0]
            elif func == "max":
                out = vals[-1]
            else:
                out = vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])
        else:
            src = self.reference if self.reference is not None else self.metrics
            note = "reference" if self.reference is not None else "own value, no reference yet"
            v = src.get(name)
            if v is None or not math.isfinite(float(v)):
                who = "the reference" if self.reference is not None else "this frame (no reference yet)"
                raise _EvalError(f"{func}({name}): {who} has no finite {name}")
            out = float(v)
        if note not in self.notes:
            self.notes.append(note)
        return out


def _arith(node: _Node, ctx: _Ctx) -> float:
    if isinstance(node, _Num):
        return node.value
    if isinstance(node, _Name):
        return ctx.value(node.name)
    if isinstance(node, _Stat):
        return ctx.stat(node.func, node.name)
    if isinstance(node, _Neg):
        return -_arith(node.arg, ctx)
    if isinstance(node, _Bin):
        a = _arith(node.left, ctx)
        b = _arith(node.right, ctx)
        if node.op == "+":
            return a + b
        if node.op == "-":
            return a - b
        if node.op == "*":
            return a * b
        if b == 0:
            raise _EvalError(f"division by zero in {_src(node)}")
        return a / b
    # a boolean used as a number: 1/0
    ok, _ = _truth(node, ctx)
    return 1.0 if ok else 0.0


def _side(node: _Node, value: float) -> str:
    if isinstance(node, _Num):
        return _fmt_num(value)
    if isinstance(node, _Name):
        return f"{node.name} {_fmt_num(value)}"
    return f"{_src(node)} = {_fmt_num(value)}"


_CMP = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


def _truth(node: _Node, ctx: _Ctx) -> tuple[bool, str]:
    """Truth value and the text of the comparison(s) that decided it."""
    if isinstance(node, _Cmp):
        a = _arith(node.left, ctx)
        b = _arith(node.right, ctx)
        ok = bool(_CMP[node.op](a, b)) if (a == a and b == b) else (node.op == "!=")
        left = _side(node.left, a)
        right = _side(node.right, b)
        return ok, f"{left} {node.op} {right}"
    if isinstance(node, _Finite):
        v = ctx.value(node.name)
        return math.isfinite(v), f"finite({node.name}) ({node.name} = {_fmt_num(v)})"
    if isinstance(node, _Not):
        ok, why = _truth(node.arg, ctx)
        return (not ok), f"not {why}"
    if isinstance(node, _Logic):
        whys: list[str] = []
        if node.op == "or":
            for arg in node.args:
                ok, why = _truth(arg, ctx)
                if ok:
                    return True, why
                whys.append(why)
            return False, " or ".join(whys)
        for arg in node.args:
            ok, why = _truth(arg, ctx)
            if not ok:
                return False, why
            whys.append(why)
        return True, " and ".join(whys)
    v = _arith(node, ctx)
    return (v == v and v != 0.0), f"{_src(node)} = {_fmt_num(v)}"


def evaluate(
    gates: Sequence[Gate],
    metrics: Mapping[str, float],
    history: Sequence[Mapping[str, float]] = (),
    *,
    reference: Mapping[str, float] | None = None,
    min_history: int = 5,
) -> Verdict:
    """Evaluate every gate on a frame's metrics.

    Parameters
    ----------
    gates : parsed gates (`parse_rules`).
    metrics : the frame's metrics by name (missing names are NaN).
    history : metrics of the accepted frames of the night (same target and filter). Default is empty.
    reference : the reference frame's metrics, used by min/max/median until ``min_history`` frames are
        accepted. Default is None.
    min_history : accepted frames needed before statistics use the history. Default is 5.
    """
    results: list[GateResult] = []
    for gate in gates:
        missing = sorted(n for n in gate.metrics if n not in metrics)
        if missing:
            results.append(GateResult(gate.name, False, f"skipped: {', '.join(missing)} not measured"))
            continue
        ctx = _Ctx(metrics, history, reference, min_history)
        try:
            failed, why = _truth(gate.tree, ctx)
        except _EvalError as exc:
            results.append(GateResult(gate.name, True, "", error=f"error: {exc}"))
            continue
        if ctx.notes:
            why = f"{why} ({', '.join(ctx.notes)})"
        results.append(GateResult(gate.name, bool(failed), why))
    failed_r = tuple(r for r in results if r.failed)
    reason = failed_r[0].reason if failed_r else ""
    return Verdict(accepted=not failed_r, reason=reason, failed=failed_r, results=tuple(results))


# ------------------------------------------------------------------------------- report records


def _json_num(v: Any) -> Any:
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return v
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return f if math.isfinite(f) else None


def frame_metrics(
    measurement: Measurement | None,
    registration: Registration | None = None,
    *,
    scale: float | None = None,
    weight: float | None = None,
    extra: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The metrics mapping the gates see: measurement metrics, plus registration and normalisation
    values when given (absent keys make gates that use them skip, see `evaluate`)."""
    out: dict[str, float] = {}
    if measurement is not None:
        m = measurement.metrics
        for name in ("stars", "fwhm_px", "fwhm_arcsec", "eccentricity", "hfr", "background", "background_rms",
                     "noise", "psf_snr", "psf_fits", "saturated_stars", "fwhm_spread_px", "beta"):
            out[name] = float(getattr(m, name))
    if registration is not None:
        out["reg_rms_px"] = float(registration.rms_px)
        out["matched_fraction"] = float(registration.matched_fraction)
        out["n_inliers"] = float(registration.n_inliers)
    if scale is not None:
        out["scale"] = float(scale)
    if weight is not None:
        out["weight"] = float(weight)
    if extra:
        out.update({k: float(v) for k, v in extra.items()})
    return out


def frame_record(
    path: str,
    measurement: Measurement | None,
    registration: Registration | None,
    verdict: Verdict | None,
    *,
    kind: str = "light",
    status: str | None = None,
    scale: float | None = None,
    weight: float | None = None,
) -> dict[str, Any]:
    """The per-frame record of the stack report (design.md, "Stack report"), JSON-ready (NaN -> null).

    Keys: path, kind, status ("stacked" / "rejected" / "failed"; default from the verdict and the
    registration), reason, failed_gates, stars, fwhm_px, fwhm_arcsec, eccentricity, hfr, background, noise,
    noise_method, psf_snr, reg_rms_px, matched_fraction, n_inliers, registration_method, transform (2x3
    affine frame -> reference, 0-based, x = column, y = row; a homography's top two rows are written as
    ``transform`` and the full 3x3 as ``homography``), scale, weight.
    """
    rec: dict[str, Any] = {"path": str(path), "kind": kind}
    reasons: list[str] = []
    if verdict is not None and not verdict.accepted:
        reasons.append(f"rejected: {verdict.reason}")
    if registration is not None and not registration.ok:
        reasons.append(f"rejected: {registration.reason}")
    if status is None:
        status = "rejected" if reasons else "stacked"
    rec["status"] = status
    rec["reason"] = "; ".join(reasons) if reasons else (registration.reason if registration is not None else "")
    rec["failed_gates"] = [r.name for r in verdict.failed] if verdict is not None else []
    m = measurement.metrics if measurement is not None else None
    for name in ("stars", "fwhm_px", "fwhm_arcsec", "eccentricity", "hfr", "background", "noise", "psf_snr"):
        rec[name] = _json_num(getattr(m, name)) if m is not None else None
    rec["noise_method"] = m.noise_method if m is not None else None
    if registration is not None:
        rec["reg_rms_px"] = _json_num(registration.rms_px)
        rec["matched_fraction"] = _json_num(registration.matched_fraction)
        rec["n_inliers"] = int(registration.n_inliers)
        rec["registration_method"] = registration.method
        if registration.ok:
            mat = registration.matrix
            rec["transform"] = [[float(v) for v in row] for row in mat[:2]]
            if registration.model == "homography":
                rec["homography"] = [[float(v) for v in row] for row in mat]
        else:
            rec["transform"] = None
    else:
        rec.update(reg_rms_px=None, matched_fraction=None, n_inliers=0, registration_method=None, transform=None)
    rec["scale"] = _json_num(scale) if scale is not None else None
    rec["weight"] = _json_num(weight) if weight is not None else None
    return rec
