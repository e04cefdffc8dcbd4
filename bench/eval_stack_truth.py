"""Stack vs ground truth on a simulated night: the figures of the integration issue.

Simulates a night (trail, cloud at 60 %, cosmic rays, hot pixels, gradients), runs `stackwatch stack`
on it and measures:

- registration error of every stacked frame over the field (RMS px, vs the true transform);
- photometric scale of every frame vs the true transparency ratio (relative error);
- star photometry of the stack vs the true fluxes (relative scatter, 1.4826 MAD and std);
- FWHM of the stack vs the mean frame FWHM;
- background noise of the stack (MRS) vs the ideal weighted mean of the accepted frames;
- the time per frame.

Usage: python bench/eval_stack_truth.py [--preset small|medium] [--lights N] [--seed S] [--osc]
Writes bench/results/eval_stack_truth.json.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--lights", type=int, default=16)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--osc", action="store_true")
    ap.add_argument("--config", help="TOML configuration passed to stackwatch stack")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="eval-stack-"))
    spec = simulate.preset(args.preset, n_lights=args.lights, n_darks=8, n_flats=8, n_darkflats=8, n_biases=8,
                           seed=args.seed, trails=(0, 3), clouds=((5, 0.6),), osc=args.osc,
                           stars_per_mpix=20000.0)
    t0 = time.perf_counter()
    simulate.simulate_night(spec, work / "night")
    t_sim = time.perf_counter() - t0
    t0 = time.perf_counter()
    code = cli(["stack", str(work / "night"), "--out", str(work / "stack.fits"), "--report",
                str(work / "report.json"), "--quiet", *(["--config", args.config] if args.config else [])])
    t_stack = time.perf_counter() - t0
    assert code == 0
    report = json.loads((work / "report.json").read_text())
    tj = json.loads((work / "night" / "truth" / "truth.json").read_text())
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
    flux_true = np.asarray(cat["flux_adu"], np.float64)
    fwhm = float(meas.metrics.fwhm_px)
    r_ap = max(3.0 * fwhm, 4.0)
    inside = (ref_xy[0] > 3 * r_ap) & (ref_xy[0] < shape[1] - 3 * r_ap) & (ref_xy[1] > 3 * r_ap) & (
        ref_xy[1] < shape[0] - 3 * r_ap)

    # the noiseless truth scene (light 1 grid) brought onto the reference grid: measuring both with the
    # same apertures cancels crowding and aperture losses
    scene = np.load(work / "night" / "truth" / "scene_adu.npy").astype(np.float32)
    if scene.ndim == 3:
        scene = scene.mean(axis=0)
    if not np.allclose(t_ref, np.eye(3)):
        from stackwatch.engine.resample import warp

        scene = warp(scene, np.linalg.inv(t_ref), shape).data
    scene = np.ascontiguousarray(np.nan_to_num(scene), dtype=np.float32)
    # unsaturated: the brightest truth pixel within the aperture stays below half of full scale
    sky_t = np.load(work / "night" / "truth" / "sky_adu.npy").astype(np.float32)
    total_t = scene + (sky_t.mean(axis=0) if sky_t.ndim == 3 else sky_t)
    from scipy import ndimage

    local_max = ndimage.maximum_filter(total_t, size=int(2 * r_ap) | 1)
    xi = np.clip(np.round(ref_xy[0]).astype(int), 0, shape[1] - 1)
    yi = np.clip(np.round(ref_xy[1]).astype(int), 0, shape[0] - 1)
    unsaturated = local_max[yi, xi] < 0.5 * 65535.0
    cand = np.flatnonzero(inside & unsaturated)
    sel = np.zeros(len(flux_true), bool)
    sel[cand[np.argsort(-flux_true[cand])][:300]] = True
    data = np.ascontiguousarray(np.nan_to_num(lum, nan=float(np.nanmedian(lum))), dtype=np.float32)
    ann = (r_ap + 3, r_ap + 3 + 2 * fwhm)
    flux, _, _ = sep.sum_circle(data, ref_xy[0][sel], ref_xy[1][sel], r_ap, bkgann=ann, subpix=5)
    flux_t, _, _ = sep.sum_circle(scene, ref_xy[0][sel], ref_xy[1][sel], r_ap, bkgann=ann, subpix=5)
    snr = flux / (sigma_stack * np.sqrt(np.pi) * r_ap)  # both in stack units
    keep = snr > 400  # photometric scatter of the stack, not of its noise (0.25 % at SNR 400)
    flux, flux_true, sel = flux[keep], flux_t[keep], np.flatnonzero(sel)[keep]
    ratio = flux / flux_true
    ratio = ratio / np.median(ratio)
    phot_mad = float(1.4826 * np.median(np.abs(ratio - 1.0)))
    phot_std = float(np.std(ratio))
    # "no star cores rejected": the brightest unsaturated stars each within 1 % of the truth, and the
    # high-rejection rate at their cores against the rate over the whole frame
    bright = np.argsort(-flux_true)[:20]
    bright_dev = np.abs(ratio[bright] - 1.0)
    rej_hi = fits.getdata(work / "stack_rejhigh.fits").astype(np.float32)
    rej_hi = rej_hi.mean(axis=0) if rej_hi.ndim == 3 else rej_hi
    cx = np.round(ref_xy[0][sel][bright]).astype(int)
    cy = np.round(ref_xy[1][sel][bright]).astype(int)
    core_rej = [float(rej_hi[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].mean()) for x, y in zip(cx, cy)]
    result = {
        "preset": args.preset, "lights": args.lights, "seed": args.seed, "osc": args.osc,
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
        "photometry_stars": len(sel), "photometry_scatter_mad": phot_mad, "photometry_scatter_std": phot_std,
        "bright20_max_abs_dev": float(bright_dev.max()), "bright20_within_1pct": float(np.mean(bright_dev < 0.01)),
        "bright20_core_rej_high_mean": float(np.mean(core_rej)), "frame_rej_high_mean": float(np.nanmean(rej_hi)),
        "rejection": report["stacks"][0].get("rejection"),
        "frames": frames_out,
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "eval_stack_truth.json").write_text(json.dumps(result, indent=1, default=float))
    for k, v in result.items():
        if k not in ("frames",):
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
