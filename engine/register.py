"""Star-based registration of a frame to the reference (algorithms.md §9.1).

A transform is a 3x3 matrix mapping frame (x, y) -> reference (x, y) (0-based pixel centres, x = column,
y = row; similarity and affine use the top two rows, a homography all nine).

- `ReferenceCatalog.from_stars(table)`: the reference's brightest usable stars, a KD-tree over them and
  the triangle invariants of the brightest 50, built once.
- `register(ref, stars, previous=...)`:
  1. fast path: predict with ``previous`` (identity when None), match nearest neighbours within
     max(3 px, 2 FWHM), least squares with outlier rejection, re-match, refine;
  2. fallback when the fast path fails: triangle invariants (astroalign's construction: each star with
     its 4 nearest neighbours gives 10 triangles, invariant (L2/L1, L1/L0)) on the 50 brightest stars of
     each side (retried with the 120 brightest when that finds nothing: partial overlap), every candidate triangle pair votes through a similarity hypothesis, the hypothesis with
     most inliers is refined on all stars as in the fast path. Rotation-free, so a meridian flip (180°)
     and frames from another night are found.
- Models: "similarity" (Umeyama closed form, default; upgraded to affine when its RMS > 0.3 px with
  >= 20 inliers), "affine" (least squares), "homography" (normalised DLT). Mirrored solutions
  (det < 0) are refused unless ``allow_mirror``.
- Never raises for 0, 1 or 2 stars: the result says ``ok=False`` with a reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.spatial import cKDTree
from stackwatch.engine.errors import StackwatchError

__all__ = [
    "MODELS",
    "ReferenceCatalog",
    "Registration",
    "apply_transform",
    "fit_transform",
    "register",
    "transform_error",
]

MODELS = ("similarity", "affine", "homography")
_MIN_INLIERS = 8
_N_TRIANGLE_STARS = (50, 120)  # first attempt, retry with more stars (partial overlap, thinned lists)


@dataclass(frozen=True)
class Registration:
    """Result of registering one frame.

    ok: the transform is usable. matrix: 3x3 frame -> reference (identity when not ok). rms_px: RMS of the
    inlier residuals (px). n_inliers: matched star pairs used. matched_fraction: n_inliers / min(stars used
    on either side). method: "fast", "triangles" or "none". model: the model actually fitted. reason: why
    not ok, or notes (e.g. "few stars", "upgraded to affine").
    """

    ok: bool
    matrix: np.ndarray
    rms_px: float
    n_inliers: int
    matched_fraction: float
    method: str
    model: str
    reason: str = ""

    @property
    def affine_2x3(self) -> list[list[float]]:
        """The top two rows of the matrix as nested lists (the report's 2x3 transform)."""
        return [[float(v) for v in row] for row in self.matrix[:2]]


def _rot_invariants(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Triangles (i, j, k index triples with vertices ordered canonically) and their invariants.

    astroalign's construction: each star with its 4 nearest neighbours, all 10 triangles of the 5. Vertex
    order: A opposite the shortest side, B opposite the middle, C opposite the longest, so matched
    triangles give vertex correspondences directly.
    """
    n = pts.shape[0]
    if n < 3:
        return np.zeros((0, 3), dtype=np.int64), np.zeros((0, 2))
    k = min(5, n)
    tree = cKDTree(pts)
    _, nn = tree.query(pts, k=k)
    nn = np.atleast_2d(nn)
    combos = np.array([(a, b, c) for a in range(k) for b in range(a + 1, k) for c in range(b + 1, k)], dtype=np.int64)
    tri = nn[:, combos].reshape(-1, 3)
    tri = np.unique(np.sort(tri, axis=1), axis=0)
    p0, p1, p2 = pts[tri[:, 0]], pts[tri[:, 1]], pts[tri[:, 2]]
    # side opposite each vertex
    s0 = np.hypot(*(p1 - p2).T)
    s1 = np.hypot(*(p0 - p2).T)
    s2 = np.hypot(*(p0 - p1).T)
    sides = np.column_stack([s0, s1, s2])
    order = np.argsort(sides, axis=1, kind="stable")  # ascending: shortest first
    tri = np.take_along_axis(tri, order, axis=1)
    ss = np.take_along_axis(sides, order, axis=1)
    good = ss[:, 0] > 1e-6 * np.maximum(ss[:, 2], 1e-12)
    tri, ss = tri[good], ss[good]
    inv = np.column_stack([ss[:, 2] / ss[:, 1], ss[:, 1] / ss[:, 0]])
    # drop very elongated triangles (ratio > 10): their invariants are unstable
    keep = inv[:, 1] * inv[:, 0] < 10.0 * 10.0
    # a triangle with two nearly equal sides has an ambiguous vertex order: keep it, voting sorts it out
    return tri[keep], inv[keep]


@dataclass(frozen=True)
class ReferenceCatalog:
    """The reference's stars (brightest first), their KD-tree and triangle invariants; built once."""

    xy: np.ndarray
    fwhm_px: float
    shape: tuple[int, int] | None
    _tree: cKDTree = field(repr=False, compare=False)
    _triangles: tuple[tuple[np.ndarray, cKDTree | None], ...] = field(repr=False, compare=False)

    @staticmethod
    def from_xy(xy: np.ndarray, *, fwhm_px: float = 3.0, shape: tuple[int, int] | None = None,
                max_stars: int = 400) -> ReferenceCatalog:
        """Catalogue from (N, 2) positions, brightest first. Default max_stars is 400."""
        pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        pts = pts[np.all(np.isfinite(pts), axis=1)][: max(0, int(max_stars))]
        sets = []
        for n_tri in _N_TRIANGLE_STARS:
            tri, inv = _rot_invariants(pts[:n_tri])
            sets.append((tri, cKDTree(inv) if len(inv) else None))
        fw = float(fwhm_px) if fwhm_px and math.isfinite(fwhm_px) and fwhm_px > 0 else 3.0
        return ReferenceCatalog(
            xy=pts, fwhm_px=fw, shape=shape, _tree=cKDTree(pts if len(pts) else np.zeros((0, 2))),
            _triangles=tuple(sets),
        )

    @staticmethod
    def from_stars(table: Any, *, fwhm_px: float | None = None, shape: tuple[int, int] | None = None,
                   max_stars: int = 400) -> ReferenceCatalog:
        """Catalogue from a `stars.StarTable`: unflagged-or-saturated stars first (edge and artefacts last).

        Saturated stars keep their (less precise) centroids: in sparse fields they are often most of the
        bright stars. Default max_stars is 400.
        """
        xy, fw = _table_xy(table, fwhm_px)
        return ReferenceCatalog.from_xy(xy, fwhm_px=fw, shape=shape, max_stars=max_stars)

    def __len__(self) -> int:
        return int(self.xy.shape[0])


def _table_xy(table: Any, fwhm_px: float | None) -> tuple[np.ndarray, float]:
    if isinstance(table, np.ndarray):
        return np.asarray(table, dtype=np.float64).reshape(-1, 2), float(fwhm_px or 3.0)
    x = np.asarray(table.x, dtype=np.float64)
    y = np.asarray(table.y, dtype=np.float64)
    flags = np.asarray(getattr(table, "flags", np.zeros(x.shape, dtype=np.int32)))
    # order: clean first, then saturated-only, then the rest (edge, blended, artefacts), brightest first within
    rank = np.where(flags == 0, 0, np.where(flags == 1, 1, 2))
    order = np.lexsort((np.arange(x.size), rank))
    order = order[(flags[order] & 8) == 0]  # artefacts (trails, galaxies) never
    fw = fwhm_px
    if fw is None:
        f = np.asarray(getattr(table, "fwhm", np.full(x.shape, np.nan)), dtype=np.float64)
        f = f[np.isfinite(f)]
        fw = float(np.median(f)) if f.size else 3.0
    return np.column_stack([x[order], y[order]]), float(fw)


# ------------------------------------------------------------------------------------- models


def apply_transform(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Map (N, 2) points through a 3x3 (or 2x3) transform."""
    m = np.asarray(matrix, dtype=np.float64)
    p = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if m.shape == (2, 3):
        return p @ m[:, :2].T + m[:, 2]
    h = p @ m[:2, :2].T + m[:2, 2]
    w = p @ m[2, :2] + m[2, 2]
    return h / w[:, None]


def _similarity(src: np.ndarray, dst: np.ndarray, allow_mirror: bool) -> np.ndarray:
    """Umeyama closed form: scale, rotation, translation minimising |dst - (s R src + t)|^2."""
    mu_s = src.mean(axis=0)
    mu_d = dst.mean(axis=0)
    a = src - mu_s
    b = dst - mu_d
    cov = b.T @ a / src.shape[0]
    u, d, vt = np.linalg.svd(cov)
    sgn = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0 and not allow_mirror:
        sgn[-1] = -1.0
    r = u @ np.diag(sgn) @ vt
    var = (a * a).sum() / src.shape[0]
    s = float((d * sgn).sum() / var) if var > 0 else 1.0
    m = np.eye(3)
    m[:2, :2] = s * r
    m[:2, 2] = mu_d - s * r @ mu_s
    return m


def _affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    a = np.column_stack([src, np.ones(src.shape[0])])
    sol, *_ = np.linalg.lstsq(a, dst, rcond=None)
    m = np.eye(3)
    m[:2, :] = sol.T
    return m


def _norm_matrix(p: np.ndarray) -> np.ndarray:
    mu = p.mean(axis=0)
    d = np.sqrt(((p - mu) ** 2).sum(axis=1)).mean()
    s = math.sqrt(2.0) / d if d > 0 else 1.0
    return np.array([[s, 0.0, -s * mu[0]], [0.0, s, -s * mu[1]], [0.0, 0.0, 1.0]])


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Normalised DLT (Hartley)."""
    ts = _norm_matrix(src)
    td = _norm_matrix(dst)
    ps = apply_transform(ts, src)
    pd = apply_transform(td, dst)
    n = src.shape[0]
    a = np.zeros((2 * n, 9))
    x, y = ps[:, 0], ps[:, 1]
    u, v = pd[:, 0], pd[:, 1]
    a[0::2, 0:3] = np.column_stack([-x, -y, -np.ones(n)])
    a[0::2, 6:9] = np.column_stack([u * x, u * y, u])
    a[1::2, 3:6] = np.column_stack([-x, -y, -np.ones(n)])
    a[1::2, 6:9] = np.column_stack([v * x, v * y, v])
    _, _, vt = np.linalg.svd(a)
    h = vt[-1].reshape(3, 3)
    m = np.linalg.inv(td) @ h @ ts
    return m / m[2, 2]


def fit_transform(src: np.ndarray, dst: np.ndarray, *, model: str = "similarity", allow_mirror: bool = False) -> np.ndarray:
    """Least-squares transform (3x3) mapping ``src`` (N, 2) onto ``dst`` (N, 2).

    Needs N >= 2 (similarity), 3 (affine), 4 (homography). Default model is "similarity".
    """
    if model not in MODELS:
        raise StackwatchError(f"unknown transform model {model!r} (expected one of {', '.join(MODELS)})")
    need = {"similarity": 2, "affine": 3, "homography": 4}[model]
    if src.shape[0] < need:
        raise StackwatchError(f"{model} needs at least {need} star pairs, got {src.shape[0]}")
    if model == "similarity":
        return _similarity(src, dst, allow_mirror)
    if model == "affine":
        return _affine(src, dst)
    return _homography(src, dst)


def transform_error(estimated: np.ndarray, truth: np.ndarray, shape: tuple[int, int], *, step_px: int = 32) -> float:
    """RMS distance (px) between two frame -> reference mappings over a grid of points covering ``shape``."""
    h, w = shape
    gy, gx = np.mgrid[0 : h : max(1, step_px), 0 : w : max(1, step_px)]
    pts = np.column_stack([gx.ravel(), gy.ravel()]).astype(np.float64)
    d = apply_transform(estimated, pts) - apply_transform(truth, pts)
    return float(np.sqrt((d * d).sum(axis=1).mean()))


# ----------------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class _Fit:
    matrix: np.ndarray
    src_idx: np.ndarray
    dst_idx: np.ndarray
    rms: float
    model: str


def _match(ref: ReferenceCatalog, pts: np.ndarray, matrix: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours of transformed frame points in the reference within ``radius``."""
    pred = apply_transform(matrix, pts)
    ok = np.all(np.isfinite(pred), axis=1)
    if not np.any(ok) or len(ref) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    dist, j = ref._tree.query(pred[ok], k=1, distance_upper_bound=radius)
    src = np.nonzero(ok)[0]
    hit = np.isfinite(dist)
    src, j, dist = src[hit], j[hit], dist[hit]
    # one frame star per reference star: keep the closest
    order = np.lexsort((dist, j))
    src, j = src[order], j[order]
    first = np.ones(j.size, dtype=bool)
    first[1:] = j[1:] != j[:-1]
    return src[first], j[first]


def _refine(ref: ReferenceCatalog, pts: np.ndarray, matrix: np.ndarray, radius: float, model: str,
            allow_mirror: bool, rounds: int = 4) -> _Fit | None:
    """Match, fit, drop pairs with residual > max(3 RMS, 0.5 px), re-match with the new transform."""
    need = {"similarity": 2, "affine": 3, "homography": 4}[model]
    m = matrix
    best: _Fit | None = None
    rad = radius
    for _ in range(rounds):
        si, di = _match(ref, pts, m, rad)
        if si.size < max(need, 3):
            return best
        for _clip in range(3):
            m_new = fit_transform(pts[si], ref.xy[di], model=model, allow_mirror=allow_mirror)
            res = np.hypot(*(apply_transform(m_new, pts[si]) - ref.xy[di]).T)
            rms = float(np.sqrt(np.mean(res * res)))
            keep = res <= max(3.0 * rms, 0.5)
            if keep.all() or keep.sum() < max(need, 3):
                break
            si, di = si[keep], di[keep]
        m = m_new
        best = _Fit(matrix=m, src_idx=si, dst_idx=di, rms=rms, model=model)
        rad = max(1.0, min(rad, 5.0 * max(rms, 0.1)))
    return best


def _triangle_hypotheses(ref: ReferenceCatalog, pts: np.ndarray, allow_mirror: bool, tol: float,
                         level: int = 0) -> list[np.ndarray]:
    """Similarity hypotheses from matched triangles, best first (most inliers among the brightest)."""
    ref_tri, inv_tree = ref._triangles[level]
    if inv_tree is None:
        return []
    fpts = pts[: _N_TRIANGLE_STARS[level]]
    tri, inv = _rot_invariants(fpts)
    if len(tri) == 0:
        return []
    pairs = inv_tree.query_ball_point(inv, r=0.03)
    fi = np.array([i for i, lst in enumerate(pairs) for _ in lst], dtype=np.int64)
    ri = np.array([j for lst in pairs for j in lst], dtype=np.int64)
    if fi.size == 0:
        return []
    # similarity per pair in complex form: z_ref = a z_frame + b (least squares over the 3 vertices)
    zf = fpts[tri[fi], 0] + 1j * fpts[tri[fi], 1]  # (K, 3)
    zr = ref.xy[ref_tri[ri], 0] + 1j * ref.xy[ref_tri[ri], 1]
    hyps: list[tuple[int, np.ndarray]] = []
    for mirror in (False, True) if allow_mirror else (False,):
        zs = np.conj(zf) if mirror else zf
        ms = zs - zs.mean(axis=1, keepdims=True)
        mr = zr - zr.mean(axis=1, keepdims=True)
        a = (mr * np.conj(ms)).sum(axis=1) / np.maximum((np.abs(ms) ** 2).sum(axis=1), 1e-12)
        b = zr.mean(axis=1) - a * zs.mean(axis=1)
        # vertex residual of the triangle itself must be small
        tri_res = np.abs(a[:, None] * zs + b[:, None] - zr).max(axis=1)
        scale = np.abs(a)
        ok = (tri_res < 2.0 * tol) & (scale > 0.5) & (scale < 2.0)
        if not np.any(ok):
            continue
        a, b = a[ok], b[ok]
        # cap the number of hypotheses to keep the vote cheap
        if a.size > 4000:
            a, b = a[:4000], b[:4000]
        zall = fpts[:, 0] + 1j * fpts[:, 1]
        if mirror:
            zall = np.conj(zall)
        pred = a[:, None] * zall[None, :] + b[:, None]  # (K, n)
        d, _ = ref._tree.query(np.column_stack([pred.real.ravel(), pred.imag.ravel()]), k=1, distance_upper_bound=tol)
        votes = np.isfinite(d).reshape(pred.shape).sum(axis=1)
        order = np.argsort(-votes, kind="stable")[:5]
        for k in order:
            m = np.eye(3)
            ar, ai = a[k].real, a[k].imag
            if mirror:
                m[:2, :2] = [[ar, ai], [ai, -ar]]
            else:
                m[:2, :2] = [[ar, -ai], [ai, ar]]
            m[:2, 2] = [b[k].real, b[k].imag]
            hyps.append((int(votes[k]), m))
    hyps.sort(key=lambda t: -t[0])
    return [m for v, m in hyps if v >= 3]


def _scale_of(m: np.ndarray) -> float:
    det = float(np.linalg.det(m[:2, :2]))
    return math.sqrt(abs(det))


def register(
    ref: ReferenceCatalog,
    stars: Any,
    *,
    previous: np.ndarray | None = None,
    model: str = "similarity",
    allow_mirror: bool = False,
    max_stars: int = 400,
    max_rms_px: float = 0.5,
    min_matched_fraction: float = 0.1,
) -> Registration:
    """Register a frame's stars to the reference catalogue.

    Parameters
    ----------
    ref : the reference catalogue.
    stars : the frame's `stars.StarTable` (or an (N, 2) array of positions, brightest first).
    previous : the previous frame's 3x3 transform to predict from (None = identity). Default is None.
    model : "similarity", "affine" or "homography". Default is "similarity".
    allow_mirror : accept mirrored (det < 0) solutions. Default is False.
    max_stars : brightest frame stars used. Default is 400.
    max_rms_px : refuse solutions whose inlier RMS exceeds this. Default is 0.5.
    min_matched_fraction : refuse when inliers / min(N_ref, N_frame) is below this (another field).
        Default is 0.1 (partial overlap still registers with >= 8 inliers).
    """
    if model not in MODELS:
        raise StackwatchError(f"unknown transform model {model!r} (expected one of {', '.join(MODELS)})")
    pts, _fw = _table_xy(stars, ref.fwhm_px)
    pts = pts[np.all(np.isfinite(pts), axis=1)][: max(0, int(max_stars))]
    n_ref, n_frm = len(ref), pts.shape[0]
    ident = np.eye(3)
    n_min = min(n_ref, n_frm)
    if n_frm < 3:
        return Registration(False, ident, math.nan, 0, 0.0, "none", model, f"too few stars ({n_frm})")
    if n_ref < 3:
        return Registration(False, ident, math.nan, 0, 0.0, "none", model, f"too few reference stars ({n_ref})")
    few = n_min < _MIN_INLIERS
    fit_model = "similarity" if few else model
    need_inl = max(3, n_min - 1) if few else _MIN_INLIERS
    radius = max(3.0, 2.0 * ref.fwhm_px)
    prev = np.asarray(previous, dtype=np.float64) if previous is not None else ident
    if prev.shape == (2, 3):
        prev = np.vstack([prev, [0.0, 0.0, 1.0]])

    def acceptable(f: _Fit | None, fast: bool) -> bool:
        if f is None:
            return False
        n_in = f.src_idx.size
        if n_in < need_inl or f.rms > max_rms_px:
            return False
        if n_in < min_matched_fraction * n_min:
            return False
        if fast and n_in < max(_MIN_INLIERS, 0.3 * n_min) and not few:
            return False
        if not allow_mirror and np.linalg.det(f.matrix[:2, :2]) < 0:
            return False
        s = _scale_of(f.matrix)
        return 0.5 < s < 2.0 and not (fast and previous is None and not 0.98 <= s <= 1.02)

    best = _refine(ref, pts, prev, radius, fit_model, allow_mirror)
    method = "fast"
    if not acceptable(best, fast=True):
        method = "triangles"
        best = None
        tol = max(2.0, ref.fwhm_px)
        for level in range(len(_N_TRIANGLE_STARS)):
            if level > 0 and (best is not None or min(n_ref, n_frm) <= _N_TRIANGLE_STARS[level - 1]):
                break
            for hyp in _triangle_hypotheses(ref, pts, allow_mirror, tol, level):
                cand = _refine(ref, pts, hyp, max(tol, 2.0), fit_model, allow_mirror)
                if acceptable(cand, fast=False) and (best is None or cand.src_idx.size > best.src_idx.size):  # type: ignore[union-attr]
                    best = cand
                    if cand is not None and cand.src_idx.size >= 0.5 * n_min:
                        break
    if best is None or not acceptable(best, fast=False):
        if best is not None and best.rms > max_rms_px:
            why = f"registration RMS {best.rms:.2f} px > {max_rms_px:.2f} px"
        else:
            why = "no match with reference (different field?)"
        return Registration(False, ident, math.nan, 0, 0.0, "none", fit_model,
                            f"{why}: {n_frm} stars, reference {n_ref}")
    notes: list[str] = []
    if few:
        notes.append(f"few stars ({n_min}): similarity only")
    if model == "similarity" and not few and best.rms > 0.3 and best.src_idx.size >= 20:
        aff = _refine(ref, pts, best.matrix, max(1.0, 5.0 * best.rms), "affine", allow_mirror, rounds=2)
        if aff is not None and aff.rms < 0.9 * best.rms and aff.src_idx.size >= _MIN_INLIERS:
            best = aff
            notes.append("upgraded to affine (similarity RMS > 0.3 px)")
    frac = best.src_idx.size / n_min if n_min else 0.0
    return Registration(
        ok=True, matrix=best.matrix, rms_px=best.rms, n_inliers=int(best.src_idx.size),
        matched_fraction=float(min(1.0, frac)), method=method, model=best.model, reason="; ".join(notes),
    )
