"""Stack vs ground truth on a simulated night: the figures of the integration issue.

Simulates a night (trail, cloud at 60 %, cosmic rays, hot pixels, gradients), runs `stackwatch stack`
on it and measures:

- registration error of every stacked frame over the field (RMS px, vs the true transform);
- photometric scale of every frame vs the true transparency ratio (relative error);
- star photometry of the stack vs the true fluxes (relative scatter, 1.4826 MAD and std);
- FWHM of the stack vs the mean frame FWHM;
- background noise of the stack (MRS) vs the ideal weighted mean of the accepted frames;
- the time per frame.

Usage: python bench/eval_stack_truth.py [--preset small|medium] [--lights N] [--seed S] [--osc] [--work DIR]
Writes bench/results/eval_stack_truth.json (``--out`` for another name).

Photometry: the brightest 300 unsaturated stars not dominated by a neighbour, measured with the same
apertures on the stack and on the truth scene blurred to the stack's PSF, kept when their SNR (from
the frames' noise) exceeds 400; per channel for colour stacks (R, G, B, their colour balance vs G) and
on the luminance (R+G+B)/3, with the worst stars listed for diagnosis. ``--work DIR`` measures an
existing run (e.g. stacked again with another ``--config``) without simulating.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import sep
from astropy.io import fits
from stackwatch.daemon.cli import main as cli
from stackwatch.engine import resample, simulate, stars, stats


def _grid_error(m: np.ndarray, t: np.ndarray, shape: tuple[int, int]) -> float:
    ys, xs = np.mgrid[0 : shape[0] : 32, 0 : shape[1] : 32]
    pts = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    d = (m @ pts - t @ pts)[:2]
    return float(np.sqrt((d**2).sum(0).mean()))


def _match_psf(img: np.ndarray, scene: np.ndarray, xy: np.ndarray, r_ap: float) -> tuple[float, np.ndarray]:
    """(σ, scene blurred by a Gaussian of σ px): the σ (0-2.5 px, 0.05 steps) whose blurred scene best
    fits ``img`` (scene in ADU, img in full scale) in stamps of radius ``r_ap`` around the stars ``xy``
    (each stamp: its own scale and background, least squares)."""
    from scipy.ndimage import gaussian_filter

    r = math.ceil(r_ap)
    h, w = img.shape
    stamps = [(round(y), round(x)) for x, y in xy.T if r <= round(x) < w - r and r <= round(y) < h - r]
    best = (np.inf, 0.0, scene)
    for sigma in np.arange(0.0, 2.55, 0.05):
        blurred = gaussian_filter(scene, sigma) if sigma > 0 else scene
        cost = 0.0
        for y, x in stamps:
            d = img[y - r : y + r + 1, x - r : x + r + 1].ravel().astype(np.float64)
            t = blurred[y - r : y + r + 1, x - r : x + r + 1].ravel().astype(np.float64)
            a = np.column_stack([t, np.ones_like(t)])
            coef = np.linalg.lstsq(a, d, rcond=None)[0]
            cost += float(np.sum((d - a @ coef) ** 2) / max(coef[0] * coef[0] * np.sum(t * t), 1e-30))
        if cost < best[0]:
            best = (cost, float(sigma), blurred)
    return best[1], np.ascontiguousarray(best[2], dtype=np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--lights", type=int, default=16)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--osc", action="store_true")
    ap.add_argument("--config", help="TOML configuration passed to stackwatch stack")
    ap.add_argument("--out", help="result JSON. Default is bench/results/eval_stack_truth.json")
    ap.add_argument("--work", help="measure the night and stack already in this folder (a previous run's, "
                                   "printed as 'work'); the other options are then read from it")
    args = ap.parse_args()
    if args.work:
        work = Path(args.work)
        tj = json.loads((work / "night" / "truth" / "truth.json").read_text())
        spec = simulate.spec_from_dict(tj["spec"])
        args.preset, args.lights, args.seed, args.osc = "work", spec.n_lights, spec.seed, spec.osc
        t_sim = t_stack = float("nan")
    else:
        work = Path(tempfile.mkdtemp(prefix="eval-stack-"))
        spec = simulate.preset(args.preset, n_lights=args.lights, n_darks=8, n_flats=8, n_darkflats=8,
                               n_biases=8, seed=args.seed, trails=(0, 3), clouds=((5, 0.6),), osc=args.osc,
                               stars_per_mpix=20000.0)
        t0 = time.perf_counter()
        simulate.simulate_night(spec, work / "night")
        t_sim = time.perf_counter() - t0
        t0 = time.perf_counter()
        code = cli(["stack", str(work / "night"), "--out", str(work / "stack.fits"), "--report",
                    str(work / "report.json"), "--quiet", *(["--config", args.config] if args.config else [])])
        t_stack = time.perf_counter() - t0
        assert code == 0
        tj = json.loads((work / "night" / "truth" / "truth.json").read_text())
    report = json.loads((work / "report.json").read_text())
    by_name = {Path(f["file"]).name: f for f in tj["frames"] if f["kind"] == "light"}
    ref_name = Path(report["stacks"][0]["reference"]).name
    t_ref = np.asarray(by_name[ref_name]["matrix"])
    shape = (spec.height, spec.width)
    reg_err, scale_err, fwhms, ideal_w, ideal_var, rho = [], [], [], [], [], []
    frames_out = []
    for f in report["frames"]:
        if f.get("kind") != "light":
            continue
        tr = by_name[Path(f["path"]).name]
        row = {"name": Path(f["path"]).name, "status": f["status"], "reason": f.get("reason")}
        if f["status"] == "stacked":
            m = np.vstack([np.asarray(f["transform"]), [0.0, 0.0, 1.0]])
            err = _grid_error(m, np.linalg.inv(t_ref) @ np.asarray(tr["matrix"]), shape)
            true_m = tr["scale"] / by_name[ref_name]["scale"]
            serr = f["scale"] / true_m - 1.0
            reg_err.append(err)
            scale_err.append(serr)
            fwhms.append(f["fwhm_px"])
            sig = f["noise"] * f["scale"]
            ideal_w.append(f["weight"])
            ideal_var.append(sig**2)
            # Lanczos-3 lowers the per-pixel variance by Σw²/(Σw)² (0.62-1.0 with the fractional shift)
            ident = np.allclose(m[:2], np.eye(3)[:2], atol=1e-9)
            rho.append(1.0 if ident else resample.warp(np.zeros(shape, np.float32), m, shape).variance_factor)
            row.update(reg_err_px=err, scale=f["scale"], true_scale=true_m, scale_rel_err=serr, cloud=tr["cloud"])
        frames_out.append(row)
    w = np.asarray(ideal_w)
    ideal_sigma = float(np.sqrt(np.sum(w**2 * np.asarray(ideal_var)) / np.sum(w) ** 2))
    ideal_sigma_rho = float(np.sqrt(np.sum(w**2 * np.asarray(ideal_var) * np.asarray(rho)) / np.sum(w) ** 2))
    stack = fits.getdata(work / "stack.fits").astype(np.float32)
    lum = stack.mean(axis=0) if stack.ndim == 3 else stack
    fill = np.where(np.isfinite(lum), lum, np.nanmedian(lum)).astype(np.float32)
    sigma_stack = float(stats.mrs_noise(fill).sigma)
    meas = stars.measure(lum)
    # photometry vs truth: true stars mapped into the reference grid
    cat = np.genfromtxt(work / "night" / "truth" / "stars.csv", delimiter=",", names=True)
    xy = np.stack([cat["x"], cat["y"], np.ones(len(cat))])
    ref_xy = (np.linalg.inv(t_ref) @ xy)[:2]
    flux_cat = np.asarray(cat["flux_adu"], np.float64)
    fwhm = float(meas.metrics.fwhm_px)
    r_ap = max(3.0 * fwhm, 4.0)
    ann = (r_ap + 3, r_ap + 3 + 2 * fwhm)
    inside = (ref_xy[0] > 3 * r_ap) & (ref_xy[0] < shape[1] - 3 * r_ap) & (ref_xy[1] > 3 * r_ap) & (
        ref_xy[1] < shape[0] - 3 * r_ap)

    # the noiseless truth scene (light 1 grid) brought onto the reference grid: measuring both with the
    # same apertures cancels aperture losses (and crowding where the stack's PSF is the scene's)
    scene = np.load(work / "night" / "truth" / "scene_adu.npy").astype(np.float32)
    planes = scene[None] if scene.ndim == 2 else scene
    if not np.allclose(t_ref, np.eye(3)):
        planes = np.stack([resample.warp(p, np.linalg.inv(t_ref), shape).data for p in planes])
    planes = np.ascontiguousarray(np.nan_to_num(planes), dtype=np.float32)
    # unsaturated: the brightest truth pixel within the aperture stays below half of full scale in every
    # channel (a CFA pixel sees its own channel, not the channel mean)
    sky_t = np.load(work / "night" / "truth" / "sky_adu.npy").astype(np.float32)
    total_t = (planes + (sky_t if sky_t.ndim == 3 else sky_t[None])).max(axis=0)
    from scipy import ndimage
    from scipy.spatial import cKDTree

    local_max = ndimage.maximum_filter(total_t, size=int(2 * r_ap) | 1)
    xi = np.clip(np.round(ref_xy[0]).astype(int), 0, shape[1] - 1)
    yi = np.clip(np.round(ref_xy[1]).astype(int), 0, shape[0] - 1)
    unsaturated = local_max[yi, xi] < 0.5 * 65535.0
    # not dominated by a neighbour: none brighter than half the star within the annulus (+ 3 FWHM)
    iso_r = ann[1] + 3.0 * fwhm
    tree = cKDTree(ref_xy.T)
    isolated = np.ones(len(flux_cat), bool)
    for k in np.flatnonzero(inside & unsaturated):
        nb = [j for j in tree.query_ball_point(ref_xy[:, k], iso_r) if j != k]
        isolated[k] = not np.any(flux_cat[nb] > 0.5 * flux_cat[k])
    # aperture noise of each plane from the frames' noise (ideal weighted mean, no resampling: Lanczos
    # keeps the variance of a sum over a large aperture). A bilinear-debayered R or B value is a mean of
    # R samples: an aperture sums each sample 4 times over N/4 sites, variance 4 N σ² (G: 2 N σ²;
    # (R+G+B)/3: 10/9 N σ²). The MRS noise of the stack sees the interpolation's smoothing, not this
    # (it read 0.29 of the ideal noise on OSC and let SNR 130 stars pass as SNR 400).
    n_ap = np.pi * r_ap**2
    n_ann = np.pi * (ann[1] ** 2 - ann[0] ** 2)
    if stack.ndim == 3:
        gains = {"lum": math.sqrt(10.0) / 3.0, "R": 2.0, "G": math.sqrt(2.0), "B": 2.0}
    else:
        gains = {"lum": 1.0}
    sigma_ap = {k: g * ideal_sigma * math.sqrt(n_ap * (1.0 + n_ap / n_ann)) for k, g in gains.items()}
    base = np.flatnonzero(inside & unsaturated & isolated)
    base = base[np.argsort(-flux_cat[base])][:300]
    data_planes = stack[None] if stack.ndim == 2 else stack
    views = {"lum": (lum, planes.mean(axis=0))}
    if stack.ndim == 3:
        views.update({c: (data_planes[i], planes[i]) for i, c in enumerate("RGB")})
    phot: dict[str, dict[str, float]] = {}
    for name, (img, truth_plane) in views.items():
        data = np.ascontiguousarray(np.nan_to_num(img, nan=float(np.nanmedian(img))), dtype=np.float32)
        # The scene has light 1's PSF, the stack a broader one (seeing of the other frames, debayering,
        # resampling). In this crowded field (20 000 stars/Mpx) nearly every aperture and annulus holds
        # neighbours, and a neighbour's share in each depends on the PSF: several % of the star for a bright
        # one at the aperture's edge, more for the broader OSC stack. The scene is blurred to the stack's
        # PSF first (Gaussian of the σ that best fits the brightest stars; flux is unchanged).
        blur_px, truth_plane = _match_psf(data, truth_plane, ref_xy[:, base[:60]], r_ap)
        flux, _, _ = sep.sum_circle(data, ref_xy[0][base], ref_xy[1][base], r_ap, bkgann=ann, subpix=5)
        flux_t, _, _ = sep.sum_circle(np.ascontiguousarray(truth_plane), ref_xy[0][base], ref_xy[1][base], r_ap,
                                      bkgann=ann, subpix=5)
        keep = flux / sigma_ap[name] > 400  # photometric error of the stack, not its noise (0.25 % at SNR 400)
        if not keep.any():
            raise SystemExit(f"{name}: no star with SNR > 400 (a larger preset or more lights is needed)")
        ratio_abs = flux[keep] / (flux_t[keep] / 65535.0)
        ratio = ratio_abs / np.median(ratio_abs)
        order = np.argsort(-flux_t[keep])
        dev = np.abs(ratio[order][:20] - 1.0)
        # check of the noise estimate on the fainter stars: deviations in units of their σ (1.0 when the
        # aperture noise is right and the photometry has no error of its own)
        snr = flux / sigma_ap[name]
        faint = (snr > 100) & ~keep
        chi = (flux[faint] / (flux_t[faint] / 65535.0) / np.median(ratio_abs) - 1.0) * snr[faint]
        phot[name] = {"stars": int(keep.sum()), "chi_mad_snr100_400": float(1.4826 * np.median(np.abs(chi))),
                      "stars_snr100_400": int(faint.sum()), "median_ratio_to_truth": float(np.median(ratio_abs)),
                      "mad": float(1.4826 * np.median(np.abs(ratio - 1.0))), "std": float(np.std(ratio)),
                      "bright20_max_abs_dev": float(dev.max()), "bright20_within_1pct": float(np.mean(dev < 0.01)),
                      "sigma_ap": sigma_ap[name], "truth_blur_sigma_px": blur_px,
                      "worst": [{"star": int(k), "x": float(ref_xy[0][k]), "y": float(ref_xy[1][k]), "dev": float(r - 1.0),
                                 "snr": float(f / sigma_ap[name])}
                                for k, r, f in sorted(zip(base[keep], ratio, flux[keep]), key=lambda t: -abs(t[1] - 1.0))[:8]]}
        if name == "lum":
            sel = base[keep][order]
    if stack.ndim == 3:
        g_med = phot["G"]["median_ratio_to_truth"]
        for c in "RB":  # colour balance of the stack vs the truth (the reference frame is the truth's)
            phot[c]["colour_vs_G"] = phot[c]["median_ratio_to_truth"] / g_med - 1.0
    # "no star cores rejected": the high-rejection rate at the brightest unsaturated stars' cores
    # against the rate over the whole frame
    bright = sel[:20]
    rej_hi = fits.getdata(work / "stack_rejhigh.fits").astype(np.float32)
    rej_hi = rej_hi.mean(axis=0) if rej_hi.ndim == 3 else rej_hi
    cx = np.round(ref_xy[0][bright]).astype(int)
    cy = np.round(ref_xy[1][bright]).astype(int)
    core_rej = [float(rej_hi[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].mean()) for x, y in zip(cx, cy)]
    result = {
        "work": str(work), "preset": args.preset, "lights": args.lights, "seed": args.seed, "osc": args.osc,
        "simulate_s": t_sim, "stack_s": t_stack, "s_per_light": t_stack / args.lights,
        "stacked": len(reg_err), "rejected": [r for r in frames_out if r["status"] != "stacked"],
        "registration_rms_px_max": max(reg_err), "registration_rms_px_mean": float(np.mean(reg_err)),
        "scale_rel_err_mean": float(np.mean(scale_err)),
        "scale_rel_err_max": float(np.max(np.abs(scale_err))), "scale_rel_err_rms": float(np.sqrt(np.mean(np.square(scale_err)))),
        "cloud_frame": next((r for r in frames_out if r.get("cloud", 1.0) < 0.9), None),
        "stack_fwhm_px": fwhm, "mean_frame_fwhm_px": float(np.mean(fwhms)), "fwhm_ratio": fwhm / float(np.mean(fwhms)),
        "stack_noise": sigma_stack, "ideal_noise_no_resampling": ideal_sigma, "noise_ratio": sigma_stack / ideal_sigma,
        "ideal_noise_with_resampling": ideal_sigma_rho, "noise_ratio_resampling": sigma_stack / ideal_sigma_rho,
        "rho_mean": float(np.mean(rho)),
        "photometry_stars": phot["lum"]["stars"], "photometry_scatter_mad": phot["lum"]["mad"],
        "photometry_scatter_std": phot["lum"]["std"], "bright20_max_abs_dev": phot["lum"]["bright20_max_abs_dev"],
        "bright20_within_1pct": phot["lum"]["bright20_within_1pct"], "photometry": phot,
        "photometry_isolated_candidates": len(base),
        "bright20_core_rej_high_mean": float(np.mean(core_rej)), "frame_rej_high_mean": float(np.nanmean(rej_hi)),
        "rejection": report["stacks"][0].get("rejection"),
        "frames": frames_out,
    }
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "eval_stack_truth.json"
    out.parent.mkdir(exist_ok=True, parents=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    for k, v in result.items():
        if k not in ("frames",):
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
