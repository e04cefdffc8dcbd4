"""Benchmark star detection + measurement, matching and resampling on a 26 MP frame (6248 x 4176).

Cases (each in a fresh subprocess; the frames are rendered once into temporary .npy files). Every
step reports the best wall time, the CPU time of that run (all threads) and the step's peak memory
above what was resident before it (VmHWM reset through /proc/self/clear_refs), next to a numpy/scipy
or sep baseline measured in the same process, as a ratio:

- ``measure``: `stars.measure` as the service runs it (detect_binning auto = 2 at 26 MP: background on
  the decimated frame, detection on 2x2 means; MRS noise on the central 1024^2, in a thread next to
  sep; our grid cleaning, detect_clean="moffat"), with the noise given, with sep's pairwise cleaning
  (detect_clean="sep") and without cleaning ("none"; ``clean_modes`` compares star lists, FWHM,
  eccentricity, registration error and matched-star flux ratios of the three), and at full resolution
  (detect_binning=1). ``mrs_noise_1024`` times the noise estimate alone. Baseline: a bare
  ``sep.Background`` + ``subfrom`` + ``sep.extract`` at 5 sigma (what any sep user pays at least).
- ``clean``: the three cleanings against rendered truth (`_clean_truth`): real stars found, spurious
  detections (overall and in bright stars' wings) and the CPU of sep.extract (+ our rule) on the frame sep
  sees in `stars.measure`, for ~8 000 and ~34 000 detections at 26 MP and FWHM 1.6 / 5 px at 3 MP.
- ``match``: `register.register` of the frame's catalogue against the reference, fast path (previous
  transform given) and triangle fallback (no previous, 40 deg rotation); baseline
  ``astroalign.find_transform`` on the same star lists.
- ``resample``: `resample.warp` Lanczos-3 (local clamp, the default; and PixInsight's clamp) for a
  rotation + sub-pixel shift, Lanczos-3 for a pure sub-pixel translation (two-pass path), bilinear;
  baselines ``scipy.ndimage.map_coordinates(order=3)`` and ``affine_transform(order=3)`` (cubic
  spline, prefilter included).

Targets (design.md): detect + measure <= 0.6 s, match <= 0.1 s, resample <= 0.7 s mono, 2 cores.
On a shared machine wall times inflate with the load (the 1-minute load average is recorded next to
every timing, ``<step>_load_1min``): CPU time / 2 estimates the wall time
of the numba-parallel steps on 2 idle cores, CPU time that of the single-threaded sep steps.

    .venv/bin/python bench/bench_measure_register.py [--width 6248 --height 4176] [--repeat 3]
        [--cases measure,clean,match,resample]

Writes bench/results/measure_register.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _vm_kb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return float(line.split()[1])
    return float("nan")


def _step(out: dict[str, Any], name: str, fn: Callable[[], Any], repeat: int) -> None:
    """Record ``name``_wall_s (best of ``repeat``), ``name``_cpu_s (CPU of all threads in that run) and
    ``name``_peak_mb (peak resident memory above the resident size before the step; the result of the
    call counts, it is what the caller holds)."""
    fn()  # warm-up: numba compile / cache load
    gc.collect()
    best = cpu = float("inf")
    peak = 0.0
    for _ in range(repeat):
        base = _vm_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        t0 = time.perf_counter()
        c0 = time.process_time()
        result = fn()
        dt = time.perf_counter() - t0
        dc = time.process_time() - c0
        peak = max(peak, (_vm_kb("VmHWM") - base) / 1024.0)
        del result
        gc.collect()
        if dt < best:
            best, cpu = dt, dc
    out[f"{name}_wall_s"] = round(best, 4)
    out[f"{name}_cpu_s"] = round(cpu, 4)
    out[f"{name}_peak_mb"] = round(peak, 1)
    out[f"{name}_load_1min"] = round(os.getloadavg()[0], 2)


def rotation_matrix(theta_deg: float, tx: float, ty: float, w: int, h: int) -> np.ndarray:
    """Frame -> reference: rotation by ``theta_deg`` about the frame centre, then (tx, ty)."""
    t = math.radians(theta_deg)
    c, s = math.cos(t), math.sin(t)
    m = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    p = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    m[:2, 2] = p - m[:2, :2] @ p + np.array([tx, ty])
    return m


def _render(path: Path, h: int, w: int, matrix: np.ndarray, seed: int) -> None:
    from stackwatch.engine.simulate_sky import render_stars

    rng = np.random.default_rng(1)
    n = int(600 * h * w / 1e6)  # ~15 000 stars above the detection limit at 26 MP
    xy = np.column_stack([rng.uniform(-200, w + 200, n), rng.uniform(-200, h + 200, n)])
    flux = 10 ** (rng.uniform(0, 1, n) ** 0.6 * 2.6 + 2.6)
    inv = np.linalg.inv(matrix)
    fxy = xy @ inv[:2, :2].T + inv[:2, 2]
    img = np.full((h, w), 800.0, dtype=np.float32)
    render_stars(img, fxy[:, 0], fxy[:, 1], flux, fwhm_px=3.0, eccentricity=0.1, beta=4.0)
    nrng = np.random.default_rng(seed)
    img = nrng.poisson(img).astype(np.float32)
    img += nrng.normal(0, 5.0, img.shape).astype(np.float32)
    img /= np.float32(65535.0)
    np.save(path, img)


def _ratio(out: dict[str, Any], name: str, base: str) -> None:
    out[f"{name}_vs_{base}_cpu"] = round(out[f"{name}_cpu_s"] / out[f"{base}_cpu_s"], 3)
    out[f"{name}_vs_{base}_wall"] = round(out[f"{name}_wall_s"] / out[f"{base}_wall_s"], 3)


def _clean_comparison(folder: Path, ref_img: np.ndarray, img: np.ndarray, m_on: Any) -> dict[str, Any]:
    """measure(detect_clean="sep") (sep's pairwise cleaning) and "none" against the default ("moffat", our
    grid cleaning, §6.1) on the same frames: star lists, PSF metrics, registration error and the
    ref/frame flux ratios of matched clean stars (what the photometric normalisation fits)."""
    from scipy.spatial import cKDTree
    from stackwatch.engine.register import ReferenceCatalog, apply_transform, register, transform_error
    from stackwatch.engine.stars import measure

    truth = np.load(folder / "truth.npy")
    h, w = img.shape
    rec: dict[str, Any] = {}
    tables = {}
    for label in ("moffat", "sep", "none"):
        m = m_on if label == "moffat" else measure(img, detect_clean=label)
        ref_m = measure(ref_img, detect_clean=label)
        tables[label] = m.stars
        ref = ReferenceCatalog.from_stars(ref_m.stars, shape=(h, w))
        r = register(ref, m.stars)
        rec[f"{label}_stars"] = m.metrics.stars
        rec[f"{label}_fwhm_px"] = m.metrics.fwhm_px
        rec[f"{label}_eccentricity"] = m.metrics.eccentricity
        rec[f"{label}_hfr"] = m.metrics.hfr
        rec[f"{label}_registration_error_px"] = round(transform_error(r.matrix, truth, (h, w), step_px=256), 5)
        rec[f"{label}_registration_inliers"] = r.n_inliers
        # photometry: frame stars mapped into the reference, matched within 1 px, both unflagged
        fs, rs = m.stars.select(m.stars.clean), ref_m.stars.select(ref_m.stars.clean)
        mapped = apply_transform(truth, np.column_stack([fs.x, fs.y]))
        d, j = cKDTree(np.column_stack([rs.x, rs.y])).query(mapped)
        ok = d < 1.0
        ratio = fs.flux[ok] / rs.flux[j[ok]]
        med = float(np.median(ratio))
        rec[f"{label}_photometry_pairs"] = int(ok.sum())
        rec[f"{label}_flux_ratio_median"] = round(med, 5)
        rec[f"{label}_flux_ratio_mad"] = round(1.4826 * float(np.median(np.abs(ratio - med))), 5)
    ours = tables["moffat"]
    for label in ("sep", "none"):
        other = tables[label]
        d, _j = cKDTree(np.column_stack([other.x, other.y])).query(np.column_stack([ours.x, ours.y]))
        rec[f"table_rows_moffat_found_{label}"] = int(np.count_nonzero(d < 0.05))
        rec[f"{label}_fwhm_rel_change"] = round(rec[f"{label}_fwhm_px"] / rec["moffat_fwhm_px"] - 1.0, 6)
        rec[f"{label}_eccentricity_change"] = round(rec[f"{label}_eccentricity"] - rec["moffat_eccentricity"], 6)
    rec["table_rows_moffat"] = len(ours)
    return rec


_SKY_E, _READ_E = 800.0, 5.0


def _truth_field(h: int, w: int, n: int, fwhm: float, beta: float, n_bright: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A mono field of n stars (power-law fluxes, most near the detection limit) and n_bright bright stars
    (3e5-3e7 e-, most saturated: clipped at 65535 e-, gain 1), sky 800 e-, read noise 5 e-."""
    from stackwatch.engine.simulate_sky import render_stars

    rng = np.random.default_rng(seed)
    xs = np.r_[rng.uniform(-20, w + 20, n), rng.uniform(30, w - 30, n_bright)]
    ys = np.r_[rng.uniform(-20, h + 20, n), rng.uniform(30, h - 30, n_bright)]
    fl = np.r_[10 ** (rng.uniform(0, 1, n) ** 0.6 * 2.6 + 2.3), 10 ** rng.uniform(5.5, 7.5, n_bright)]
    img = np.full((h, w), _SKY_E, dtype=np.float32)
    render_stars(img, xs, ys, fl, fwhm_px=fwhm, beta=beta)
    img = rng.poisson(img).astype(np.float32) + rng.normal(0, _READ_E, img.shape).astype(np.float32)
    img = np.minimum(img, 65535.0) / np.float32(65535.0)
    return img.astype(np.float32), xs, ys, fl


def _clean_truth(h: int, w: int, n: int, fwhm: float, beta: float, n_bright: int, seed: int) -> dict[str, Any]:
    """sep's cleaning, ours and none on the frame sep sees inside `stars.measure` (binned at >= 4 MP),
    against the rendered truth: a detection is real when a true star (of peak >= 1 sigma of the sky: nothing
    fainter can make a 5 sigma detection) lies within max(1.5, FWHM/2) px, else spurious; "in wings" = within
    the radius where a bright star's (peak >= 300 sigma) true profile is above 1 sigma. CPU of sep.extract
    (+ our rule) on that frame, best of 2."""
    import sep
    from scipy.spatial import cKDTree
    from stackwatch.engine import stars
    from stackwatch.engine.simulate_sky import moffat_alpha

    img, xs, ys, fl = _truth_field(h, w, n, fwhm, beta, n_bright, seed)
    cap: dict[str, Any] = {}
    orig = stars._extract

    def spy(data: np.ndarray, thresh: float, mask: Any, minarea: int, kernel: np.ndarray,
            clean: str = "moffat") -> Any:
        cap.update(data=data.copy(), thresh=thresh, mask=mask, minarea=minarea, kernel=kernel)
        return orig(data, thresh, mask, minarea, kernel, clean)

    stars._extract = spy  # type: ignore[assignment]
    try:
        stars.measure(img, fwhm_guess_px=fwhm, saturation=1.0)
    finally:
        stars._extract = orig  # type: ignore[assignment]
    data, thresh, minarea = cap["data"], cap["thresh"], cap["minarea"]
    kw = {"mask": cap["mask"], "minarea": minarea, "filter_kernel": cap["kernel"], "filter_type": "matched",
          "deblend_nthresh": 32, "deblend_cont": 0.005}
    binned = data.shape[0] < img.shape[0]
    sigma = math.sqrt(_SKY_E + _READ_E**2)
    alpha = moffat_alpha(fwhm, beta)
    peak_e = fl * (beta - 1) / (math.pi * alpha * alpha)
    visible = peak_e >= sigma
    tx, ty = xs[visible], ys[visible]
    bright = peak_e >= 300 * sigma
    r_wing = alpha * np.sqrt(np.maximum((peak_e[bright] / sigma) ** (1 / beta) - 1, 0))
    btree = cKDTree(np.column_stack([xs[bright], ys[bright]]))
    r_match = max(1.5, 0.5 * fwhm)
    ttree = cKDTree(np.column_stack([tx, ty]))

    def in_wing(px: np.ndarray, py: np.ndarray) -> np.ndarray:
        out = np.zeros(px.size, dtype=bool)
        if px.size == 0 or not bright.any():
            return out
        for k, members in enumerate(btree.query_ball_point(np.column_stack([px, py]), r=float(r_wing.max()))):
            for i in members:
                dd = math.hypot(px[k] - xs[bright][i], py[k] - ys[bright][i])
                out[k] |= r_match < dd < r_wing[i]
        return out

    rec: dict[str, Any] = {"shape": [h, w], "fwhm_px": fwhm, "beta": beta, "binned_detection": binned,
                           "true_stars_visible": int(visible.sum()), "bright_stars": int(bright.sum()),
                           "load_1min": round(os.getloadavg()[0], 2)}
    for mode in ("sep", "moffat", "none"):
        best = rule = math.inf
        for _ in range(2):
            c0 = time.process_time()
            o = sep.extract(data, thresh, clean=mode == "sep", **kw)
            c1 = time.process_time()
            if mode == "moffat":
                o = stars._clean(o, thresh, minarea)
            c2 = time.process_time()
            if c2 - c0 < best:
                best, rule = c2 - c0, c2 - c1
        x, y = np.asarray(o["x"]), np.asarray(o["y"])
        if binned:
            x, y = 2.0 * x + 0.5, 2.0 * y + 0.5
        d, j = ttree.query(np.column_stack([x, y]))
        real = d <= r_match
        found = np.unique(j[real])
        rec[mode] = {"detections": len(o), "real_stars_found": int(found.size),
                     "real_found_in_wings": int(in_wing(tx[found], ty[found]).sum()),
                     "spurious": int((~real).sum()), "spurious_in_wings": int((~real & in_wing(x, y)).sum()),
                     "extract_cpu_s": round(best, 4)}
        if mode == "moffat":
            rec[mode]["rule_cpu_s"] = round(rule, 4)
    return rec


def _case(name: str, folder: Path, repeat: int) -> dict[str, Any]:
    from stackwatch.engine.register import ReferenceCatalog, register, transform_error
    from stackwatch.engine.resample import warp
    from stackwatch.engine.stars import measure

    out: dict[str, Any] = {"case": name}
    ref_img = np.load(folder / "ref.npy")
    h, w = ref_img.shape
    if name == "measure":
        import sep
        from stackwatch.engine import stats

        img = np.load(folder / "frame.npy")
        for label, kw in (("measure", {}), ("measure_sep_clean", {"detect_clean": "sep"}),
                          ("measure_no_clean", {"detect_clean": "none"}),
                          ("measure_full_res", {"detect_binning": 1})):
            m = measure(img, **kw)
            out[f"{label}_stars"] = m.metrics.stars
            out[f"{label}_fwhm_px"] = round(m.metrics.fwhm_px, 4)
            out[f"{label}_eccentricity"] = round(m.metrics.eccentricity, 4)
            out[f"{label}_hfr"] = round(m.metrics.hfr, 4)
            out[f"{label}_psf_fits"] = m.metrics.psf_fits
        m = measure(img)
        noise = m.metrics.noise
        out["clean_modes"] = _clean_comparison(folder, ref_img, img, m)

        def sep_only() -> Any:
            b = sep.Background(img)
            sub = img.copy()
            b.subfrom(sub)
            return sep.extract(sub, 5.0 * b.globalrms, minarea=5)

        h0, w0 = (h - 1024) // 2, (w - 1024) // 2
        window = np.ascontiguousarray(img[h0 : h0 + 1024, w0 : w0 + 1024])
        _step(out, "baseline_sep", sep_only, repeat)
        # the noise estimate alone: measure runs it in a thread next to sep, off the wall time
        _step(out, "mrs_noise_1024", lambda: stats.mrs_noise(window, valid_range=(-np.inf, 0.99998)), repeat)
        _step(out, "measure", lambda: measure(img), repeat)
        _step(out, "measure_noise_given", lambda: measure(img, noise=noise), repeat)
        _step(out, "measure_sep_clean", lambda: measure(img, detect_clean="sep"), repeat)
        _step(out, "measure_no_clean", lambda: measure(img, detect_clean="none"), repeat)
        _step(out, "measure_full_res", lambda: measure(img, detect_binning=1), repeat)
        for label in ("measure", "measure_noise_given", "measure_sep_clean", "measure_no_clean", "measure_full_res"):
            _ratio(out, label, "baseline_sep")
    elif name == "clean":
        # (label, h, w, rendered stars, FWHM, beta, bright stars): ~8 000 and ~34 000 detections at 26 MP
        # (binned detection, 1.6 px stars on the binned frame), and undersampled / wide PSFs at 3 MP
        fields = [("26mp_8k", 4176, 6248, 13000, 3.2, 2.5, 30), ("26mp_40k", 4176, 6248, 70000, 3.2, 2.5, 30),
                  ("3mp_fwhm1.6", 1500, 2000, 3000, 1.6, 2.5, 12), ("3mp_fwhm5_beta2", 1500, 2000, 3000, 5.0, 2.0, 12)]
        for k, (label, hh, ww, n, fw, beta, nb) in enumerate(fields):
            out[label] = _clean_truth(hh, ww, n, fw, beta, nb, seed=11 + k)
    elif name == "match":
        import astroalign

        ref_m = measure(ref_img)
        ref = ReferenceCatalog.from_stars(ref_m.stars, shape=(h, w))
        truth = np.load(folder / "truth.npy")
        fm = measure(np.load(folder / "frame.npy"))
        near = truth @ np.array([[1.0, 0.0, 0.6], [0.0, 1.0, -0.4], [0.0, 0.0, 1.0]])
        r_fast = register(ref, fm.stars, previous=near)
        r_tri = register(ref, fm.stars)
        out["fast_ok"] = r_fast.ok
        out["fast_method"] = r_fast.method
        out["fast_error_px"] = transform_error(r_fast.matrix, truth, (h, w), step_px=256)
        out["triangles_method"] = r_tri.method
        out["triangles_error_px"] = transform_error(r_tri.matrix, truth, (h, w), step_px=256)
        out["n_ref"] = len(ref)
        out["n_inliers"] = r_fast.n_inliers
        src = np.column_stack([fm.stars.x, fm.stars.y])[:400]
        dst = np.column_stack([ref_m.stars.x, ref_m.stars.y])[:400]
        try:
            _step(out, "baseline_astroalign", lambda: astroalign.find_transform(src, dst, max_control_points=50),
                  repeat)
        except Exception as exc:  # astroalign raises MaxIterError when it finds nothing
            out["baseline_astroalign_error"] = f"{type(exc).__name__}: {exc}"
        _step(out, "match_fast", lambda: register(ref, fm.stars, previous=near), repeat)
        _step(out, "match_triangles", lambda: register(ref, fm.stars), repeat)
        _step(out, "reference_catalog", lambda: ReferenceCatalog.from_stars(ref_m.stars), repeat)
        if "baseline_astroalign_cpu_s" in out:
            _ratio(out, "match_fast", "baseline_astroalign")
            _ratio(out, "match_triangles", "baseline_astroalign")
    elif name == "resample":
        from scipy import ndimage

        img = np.load(folder / "frame.npy")
        truth = np.load(folder / "truth.npy")
        shift = np.array([[1.0, 0.0, 23.37], [0.0, 1.0, -11.61], [0.0, 0.0, 1.0]])
        inv = np.linalg.inv(truth)
        # ndimage works in (row, col): swap axes of the affine map
        mat = np.array([[inv[1, 1], inv[1, 0]], [inv[0, 1], inv[0, 0]]])
        off = np.array([inv[1, 2], inv[0, 2]])

        def scipy_map_coordinates() -> Any:
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            coords = np.array([inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2], inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]])
            return ndimage.map_coordinates(img, coords, order=3, cval=np.nan, output=np.float32)

        reps = max(1, repeat - 2)
        _step(out, "baseline_scipy_map_coordinates3", scipy_map_coordinates, reps)
        _step(out, "baseline_scipy_affine3", lambda: ndimage.affine_transform(img, mat, offset=off, order=3, cval=np.nan,
                                                                              output=np.float32), reps)
        _step(out, "lanczos3", lambda: warp(img, truth, (h, w)), repeat)
        _step(out, "lanczos3_pixinsight_clamp", lambda: warp(img, truth, (h, w), clamp_method="pixinsight"), repeat)
        _step(out, "lanczos3_translation", lambda: warp(img, shift, (h, w)), repeat)
        _step(out, "bilinear", lambda: warp(img, truth, (h, w), method="bilinear"), repeat)
        for label in ("lanczos3", "lanczos3_pixinsight_clamp", "lanczos3_translation", "bilinear"):
            _ratio(out, label, "baseline_scipy_map_coordinates3")
    out["load_avg_1min"] = os.getloadavg()[0]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=6248)
    ap.add_argument("--height", type=int, default=4176)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--case", default="")
    ap.add_argument("--cases", default="measure,clean,match,resample", help="cases to run, comma-separated")
    ap.add_argument("--folder", default="")
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(_case(args.case, Path(args.folder), args.repeat)))
        return 0
    results: dict[str, Any] = {"width": args.width, "height": args.height, "cpus": os.cpu_count(),
                               "load_avg": os.getloadavg(), "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        truth = rotation_matrix(40.0, 23.4, -11.7, args.width, args.height)
        t0 = time.perf_counter()
        _render(folder / "ref.npy", args.height, args.width, np.eye(3), seed=2)
        _render(folder / "frame.npy", args.height, args.width, truth, seed=3)
        np.save(folder / "truth.npy", truth)
        print(f"rendered two {args.width}x{args.height} frames in {time.perf_counter() - t0:.1f} s", flush=True)
        for case in args.cases.split(","):
            proc = subprocess.run(
                [sys.executable, __file__, "--case", case, "--folder", str(folder), "--repeat", str(args.repeat)],
                capture_output=True, text=True, check=False,
            )
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                results["cases"].append({"case": case, "error": proc.stderr.strip().splitlines()[-1:]})
                continue
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            results["cases"].append(rec)
            print(json.dumps(rec, indent=1), flush=True)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "measure_register.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
