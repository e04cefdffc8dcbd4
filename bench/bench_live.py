"""Benchmark the live accumulator (engine.live) on a 26 MP mono frame (6248 x 4176), and NSG apply.

Per update n = 1..N (after a warm-up that compiles or loads the numba cache on a tiny stack): wall
and CPU time (time.process_time: all threads of the process), retroactive removals and arrival
rejections; peak RSS; snapshot, checkpoint save and load (wall and CPU); and in the same run a
numpy baseline, a plain running weighted mean of the same frames (S += w*y; W += w; S/W, no
rejection), reported as a ratio; per update the 1-min load average and the fraction of pixels the
k21 kernel sent through its full logic. ``--live-module FILE`` (repeatable) also runs another version
of live.py (e.g. one saved from git: ``git show REV:engine/live.py > /tmp/live_before.py``) in the
same process, for before/after figures. Also times
normalize.apply and a normalize() fit unless --skip-normalize. Writes bench/results/live.json.
Budget (design.md, §10): live update <= 0.3 s mono on 2 cores.

    .venv/bin/python bench/bench_live.py [--frames 12] [--width 6248 --height 4176] [--skip-normalize]
        [--live-module /tmp/live_before.py] [--rejections-dir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from stackwatch.engine import live as live_mod
from stackwatch.engine import normalize as nz


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load_module(path: str) -> Any:
    name = Path(path).stem  # numba's cache finds the module again by this name
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _timed(fn: Any) -> tuple[Any, float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def _bench_stack(mod: Any, label: str, frame: Any, shape: tuple[int, int], bgrid: np.ndarray, nfr: int,
                 rej_dir: str | None) -> dict[str, Any]:
    h, w = shape
    warm = mod.LiveStack((64, 64), background=bgrid[:2, :2], background_step_px=64)
    for i in range(7):
        warm.update(f"w{i}", np.full((64, 64), 0.1, np.float32), weight=1.0, noise=0.002)
    kw = {} if rej_dir is None else {"rejections_dir": rej_dir}
    st = mod.LiveStack((h, w), background=bgrid, background_step_px=64, **kw)
    per: list[dict[str, Any]] = []
    for i in range(nfr):
        y = frame(i)
        r, wall, cpu = _timed(lambda y=y, i=i: st.update(f"f{i}", y, weight=1.0 + 0.02 * i, noise=0.002))
        # pixels the k21 kernel sent through its full logic (the rest took the simple pass); None
        # for versions without the pass
        full = getattr(st, "_full_path_px", None)
        per.append({"n": i + 1, "wall_s": wall, "cpu_s": cpu, "retro": r.retro_removed,
                    "arrival": r.rejected_high + r.rejected_low, "load_1min": os.getloadavg()[0],
                    "full_path_fraction": None if full is None else full / (h * w)})
        print(f"[{label}] update {i + 1:2d}: wall {wall:.3f} s cpu {cpu:.3f} s  retro {r.retro_removed}"
              f"  arrival {r.rejected_high + r.rejected_low}  load {os.getloadavg()[0]:.1f}"
              + ("" if full is None else f"  full logic {full / (h * w):.2%}"), flush=True)
        del y
    out: dict[str, Any] = {"updates": per, "state_mb": st.nbytes / 1e6}
    tested = [p for p in per if p["n"] > 5] or per
    out["update_wall_s_median_n_gt_5"] = statistics.median(p["wall_s"] for p in tested)
    out["update_cpu_s_median_n_gt_5"] = statistics.median(p["cpu_s"] for p in tested)
    early = [p for p in per[1:5]] or per
    out["update_cpu_s_median_n_2_to_5"] = statistics.median(p["cpu_s"] for p in early)
    out["load_1min_median_n_gt_5"] = statistics.median(p["load_1min"] for p in tested)
    out["rss_peak_mb_after_updates"] = _rss_mb()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        snap, out["snapshot_wall_s"], out["snapshot_cpu_s"] = _timed(st.snapshot)
        _, out["save_wall_s"], out["save_cpu_s"] = _timed(lambda s=snap: s.save(Path(tmp) / "ck"))
        if "into" in inspect.signature(st.snapshot).parameters:  # the next checkpoint reuses the planes
            snap, out["snapshot_reuse_wall_s"], out["snapshot_reuse_cpu_s"] = _timed(lambda s=snap: st.snapshot(into=s))
        del snap
        loaded, out["load_wall_s"], out["load_cpu_s"] = _timed(lambda: mod.LiveStack.load(Path(tmp) / "ck"))
        out["checkpoint_mb"] = sum(p.stat().st_size for p in (Path(tmp) / "ck").iterdir()) / 1e6
        assert np.array_equal(loaded.image(), st.image(), equal_nan=True)
        del loaded
    out["rss_peak_mb"] = _rss_mb()
    print(f"[{label}] snapshot {out['snapshot_wall_s']:.2f} s, save {out['save_wall_s']:.2f} s "
          f"(cpu {out['save_cpu_s']:.2f}), load {out['load_wall_s']:.2f} s (cpu {out['load_cpu_s']:.2f}), "
          f"{out['checkpoint_mb']:.0f} MB", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--width", type=int, default=6248)
    ap.add_argument("--height", type=int, default=4176)
    ap.add_argument("--skip-normalize", action="store_true")
    ap.add_argument("--live-module", action="append", default=[], help="another live.py to run in the same process")
    ap.add_argument("--rejections-dir", default=None, help="spill the rejection lists there")
    ap.add_argument("--exact-frames", type=int, default=0, help="also time an exact pass over this many .npy frames")
    args = ap.parse_args()
    h, w, nfr = args.height, args.width, args.frames
    rng = np.random.default_rng(3)
    base = (0.1 + 0.01 * np.linspace(0, 1, w, dtype=np.float32)[None, :]).astype(np.float32) * np.ones((h, 1), np.float32)
    pool = [rng.normal(0, 0.002, (h, w)).astype(np.float32) for _ in range(2)]

    def frame(i: int) -> np.ndarray:
        y = base + np.roll(pool[i % 2], 37 * i, axis=1)
        if i == 0:
            y[h // 2 : h // 2 + 3, :] += 0.05  # a trail across the frame
        return y

    results: dict[str, Any] = {"shape": [h, w], "frames": nfr, "cpus": os.cpu_count(),
                               "load_average_1min_start": os.getloadavg()[0]}
    yy, xx = np.mgrid[0 : h // 64 + 2, 0 : w // 64 + 2]
    bgrid = (0.1 + 0.01 * xx / (w // 64) - 0.003 * yy / (h // 64)).astype(np.float64)
    mods = [("current", live_mod)] + [(Path(p).stem, _load_module(p)) for p in args.live_module]
    results["rss_peak_mb_before_stacks"] = _rss_mb()
    for label, mod in mods:
        results[label] = _bench_stack(mod, label, frame, (h, w), bgrid, nfr, args.rejections_dir)

    # baseline in the same run: plain running weighted mean, no rejection
    s = np.zeros((h, w), np.float32)
    ws = np.zeros((h, w), np.float32)
    tb: list[float] = []
    tbc: list[float] = []
    for i in range(nfr):
        y = frame(i)
        t0, c0 = time.perf_counter(), time.process_time()
        fin = np.isfinite(y)
        s += np.where(fin, np.float32(1.0 + 0.02 * i) * y, 0)
        ws += np.float32(1.0 + 0.02 * i) * fin
        _ = s / ws
        tb.append(time.perf_counter() - t0)
        tbc.append(time.process_time() - c0)
    results["numpy_running_mean_wall_s"] = statistics.median(tb[1:] if len(tb) > 1 else tb)
    results["numpy_running_mean_cpu_s"] = statistics.median(tbc[1:] if len(tbc) > 1 else tbc)
    del s, ws
    for label, _ in mods:
        r = results[label]
        r["ratio_cpu_vs_numpy_running_mean"] = r["update_cpu_s_median_n_gt_5"] / results["numpy_running_mean_cpu_s"]
        r["ratio_wall_vs_numpy_running_mean"] = r["update_wall_s_median_n_gt_5"] / results["numpy_running_mean_wall_s"]
    results["load_average_1min_end"] = os.getloadavg()[0]

    if not args.skip_normalize:
        # NSG on the same frame size: stars on a grid, frame = 0.8·ref + gradient
        from bench_normalize import add_star_grid  # beside this script

        ref = frame(1)
        xs, ys = add_star_grid(ref, rng)
        fr = (0.8 * ref + 0.005 * np.linspace(0, 1, h, dtype=np.float32)[:, None]).astype(np.float32)
        stars = np.column_stack([xs, ys])
        nz.normalize(fr[:512, :512], ref[:512, :512], frame_stars=stars[:5], ref_stars=stars[:5], frame_noise=0.002,
                     ref_noise=0.002)  # warm-up (numba)
        t0 = time.perf_counter()
        norm = nz.normalize(fr, ref, frame_stars=stars, ref_stars=stars, frame_noise=0.0016, ref_noise=0.002,
                            fwhm_px=3.0)
        results["normalize_fit_s"] = time.perf_counter() - t0
        results["normalize_scale"] = norm.scale
        results["normalize_scale_truth"] = 1.25
        results["normalize_pairs"] = norm.n_pairs
        t0 = time.perf_counter()
        out = nz.apply(fr, norm)
        results["normalize_apply_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        _ = fr * np.float32(1.25)
        results["numpy_scale_only_s"] = time.perf_counter() - t0
        del out
    if args.exact_frames:
        from stackwatch.engine.integrate import NpySource

        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
            st = live_mod.LiveStack((h, w), background=0.1)
            paths = []
            for i in range(args.exact_frames):
                y = frame(i)
                p = Path(tmp) / f"f{i}.npy"
                np.save(p, y)
                paths.append(p)
                st.update(f"f{i}", y, weight=1.0, noise=0.002)
                del y
            t0, c0 = time.perf_counter(), time.process_time()
            res = st.exact_pass([NpySource(p) for p in paths])
            results["exact_pass_s"] = time.perf_counter() - t0
            results["exact_pass_cpu_s"] = time.process_time() - c0
            results["exact_pass_frames"] = args.exact_frames
            results["exact_pass_rejection"] = res.rejection
            from stackwatch.engine.integrate import integrate

            t0, c0 = time.perf_counter(), time.process_time()
            integrate([NpySource(p) for p in paths], weights=np.ones(len(paths)), rejection=res.rejection,
                      params=res.params)
            results["batch_integrate_only_s"] = time.perf_counter() - t0
            results["batch_integrate_only_cpu_s"] = time.process_time() - c0
            del st
    results["rss_peak_mb_end"] = _rss_mb()
    for k, v in results.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                if kk != "updates":
                    print(f"{k + '.' + kk:50s} {vv}")
        else:
            print(f"{k:50s} {v}")
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "live.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
