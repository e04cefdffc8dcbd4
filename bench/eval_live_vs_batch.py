"""Live vs batch after every frame of a simulated night, through the real pipeline (issue #5, §10).

Simulates a night (trails, a cloud frame), feeds the lights one by one to the pipeline in capture
order as the service does, and after every frame compares the live image with the batch
integration of the same stored frames (what ``stackwatch stack`` runs: §7.5's algorithm, the
stack's noise model as rejection floor, large-scale rejection as configured). Outside the true
trails (the simulator's trail masks, warped with each frame's transform and dilated 3 px) it reports
RMS, 99.9th percentile and max of live − batch in units of the batch's noise (§1.2), then the exact
pass vs batch.

    python bench/eval_live_vs_batch.py [--preset small] [--lights 16] [--seed 5] [--service-policy]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from stackwatch.daemon.config import load_config
from stackwatch.daemon.pipeline import Pipeline, classify_paths
from stackwatch.daemon.service import exact_pass_due
from stackwatch.engine import simulate, stats
from stackwatch.engine.integrate import Integration, NpySource, integrate
from stackwatch.engine.reject import auto_rejection
from stackwatch.engine.resample import warp_mask


def _batch(pipe: Any, stack: Any, config: Any) -> tuple[Integration, list[NpySource]]:
    """The batch integration of the stack's stored frames, as `stackwatch stack` runs it."""
    live = stack.live
    ids = list(live.frame_ids)
    pipe.flush_store()  # the last frame's store write may still be in flight
    sources = [NpySource(pipe.frames_dir / stack.id / f"{fid}.npy") for fid in ids]
    weights = [next(f.weight for f in live.frames if f.frame_id == fid) for fid in ids]
    name, params = auto_rejection(len(ids))
    batch = integrate(sources, weights=weights, rejection=name, params=params,
                      noise_model=live.noise_model(ids), large_scale=config.integration.large_scale_rejection)
    return batch, sources


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--lights", type=int, default=16)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--debug", action="store_true", help="print the worst pixel of each frame")
    ap.add_argument("--config", help="TOML configuration (as for stackwatch stack)")
    ap.add_argument("--service-policy", action="store_true",
                    help="after each frame, run the exact pass when the service would (service.exact_pass_due, "
                         "with the pipeline's estimate and frames --gap seconds apart); default: the live stack alone")
    ap.add_argument("--gap", type=float, default=120.0, help="seconds between frames for --service-policy")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="eval-live-"))
    spec = simulate.preset(args.preset, n_lights=args.lights, n_darks=8, n_flats=8, n_darkflats=8, n_biases=8,
                           seed=args.seed, trails=(0, 3), clouds=((5, 0.6),), stars_per_mpix=20000.0)
    simulate.simulate_night(spec, work / "night")
    config = load_config(args.config)
    pipe = Pipeline(config, work / "state")
    files = classify_paths([work / "night"])
    cal = [str(p) for p, i, _ in files if i is not None and i.is_calibration]
    pipe.library.add_frames(cal, rebuild=False)
    pipe.flush_masters()
    lights = sorted(((p, i) for p, i, _ in files if i is not None and i.kind == "light"),
                    key=lambda pi: str(getattr(pi[1], "date_obs", "") or pi[0].name))
    rows = []
    new_since_pass = 0
    for k, (path, info) in enumerate(lights, 1):
        t0 = time.perf_counter()
        pipe.process_light(path, info)
        t_live = time.perf_counter() - t0
        stack = next(iter(pipe._stacks.values()))
        live = stack.live
        if live is None or live.n_frames == 0:
            continue
        new_since_pass += 1
        passed = False
        if args.service_policy and exact_pass_due(new_frames=new_since_pass, stack_frames=live.n_frames,
                                                  estimate_s=pipe.exact_pass_estimate_s(stack.id), gap_s=args.gap,
                                                  quiet=False, live=config.live):
            pipe.finalize(stack.id)
            new_since_pass, passed = 0, True
        batch, sources = _batch(pipe, stack, config)
        ids = list(live.frame_ids)
        img = np.asarray(batch.image, np.float32)
        lv = np.asarray(live.image(), np.float32)
        sigma = float(stats.mrs_noise(np.nan_to_num(img, nan=float(np.nanmedian(img)))).sigma)
        trails = np.zeros(img.shape[-2:], bool)
        for rec in pipe.members(stack.id):
            tm = work / "night" / "truth" / f"trail_mask_{Path(rec['path']).stem}.npy"
            if rec.get("status") == "stacked" and tm.exists() and rec.get("transform") is not None:
                trails |= warp_mask(np.load(tm), np.asarray(rec["transform"]), img.shape[-2:], dilate_px=3)
        ok = ~trails & np.isfinite(img) & np.isfinite(lv)
        d = (lv - img)[ok] / sigma
        row = {"k": k, "n": len(ids), "rejection": batch.rejection, "rms_sigma": float(np.sqrt(np.mean(d**2))),
               "max_sigma": float(np.abs(d).max()), "p999_sigma": float(np.quantile(np.abs(d), 0.999)),
               "trail_fraction": float(trails.mean()), "process_s": t_live, "exact_pass": passed}
        if args.debug and row["max_sigma"] > 5:
            full = np.where(ok, (lv - img) / sigma, 0)
            yx = np.unravel_index(np.argmax(np.abs(full)), full.shape)
            vals = [float(src.read_band(yx[-2], yx[-2] + 1)[..., 0, yx[-1]]) for src in sources]
            print("  worst", yx, "live", float(lv[yx]), "batch", float(img[yx]), "sigma", sigma,
                  "batch rej lo/hi", int(batch.rej_low[yx]), int(batch.rej_high[yx]),
                  "live rej", [int(a[yx]) for a in live.rejection_counts()], "samples", np.round(vals, 1).tolist(),
                  "dist to trail px", float(np.min(np.hypot(*(np.argwhere(trails) - np.array(yx)).T))) if trails.any() else None)
        rows.append(row)
        print(json.dumps(row))
    sid = next(iter(pipe._stacks))
    pipe.finalize(sid)
    stack = pipe._stacks[sid]
    final = np.asarray(stack.live.image(), np.float32)
    batch, _ = _batch(pipe, stack, config)
    rel = np.nanmax(np.abs(final - batch.image) / (np.abs(batch.image) + 1e-12))
    print(json.dumps({"final_exact_pass_vs_batch_max_rel": float(rel),
                      "worst_rms_sigma": max(r["rms_sigma"] for r in rows),
                      "worst_max_sigma": max(r["max_sigma"] for r in rows)}))
    pipe.close()


if __name__ == "__main__":
    main()
