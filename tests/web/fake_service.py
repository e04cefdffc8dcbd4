"""A fake of the service's ServiceView for the web tests: a seeded night that grows frame by frame.

Each `add_frame()` makes one light with plausible metrics and a verdict (every `reject_every`-th frame
is rejected with a reason), updates the running mean of its stack (a star field plus noise that
shrinks as frames accumulate), the rejection and coverage maps, and emits the events the real
service emits: frame_received, frame_processed, stack_updated. Listeners are called synchronously,
so call `add_frame` on the event-loop thread (or through `loop.call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

Listener = Callable[[dict[str, Any]], None]


def star_field(shape: tuple[int, int], *, seed: int = 0, n_stars: int = 60, background: float = 0.05) -> np.ndarray:
    """A noiseless sky: flat background plus Gaussian stars (FWHM about 3 px), float32, full scale 1."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    sky = np.full(shape, background, dtype=np.float64)
    sig = 3.0 / 2.3548
    for _ in range(n_stars):
        x0, y0 = rng.uniform(5, w - 5), rng.uniform(5, h - 5)
        amp = 10 ** rng.uniform(-2.3, -0.3)
        r0, r1 = int(max(0, y0 - 10)), int(min(h, y0 + 11))
        c0, c1 = int(max(0, x0 - 10)), int(min(w, x0 + 11))
        sky[r0:r1, c0:c1] += amp * np.exp(-((xx[r0:r1, c0:c1] - x0) ** 2 + (yy[r0:r1, c0:c1] - y0) ** 2) / (2 * sig**2))
    # a faint nebula so the stretch has something to show
    sky += 0.01 * np.exp(-(((xx - w * 0.55) / (w * 0.2)) ** 2 + ((yy - h * 0.45) / (h * 0.25)) ** 2))
    return sky.astype(np.float32)


class FakeService:
    """Implements stackwatch.web.app.ServiceView in memory."""

    def __init__(self, *, seed: int = 0, shape: tuple[int, int] = (240, 320), reject_every: int = 4,
                 target: str = "M27", filter: str = "L", full_events: bool = False) -> None:
        self.rng = np.random.default_rng(seed)
        self.full_events = full_events
        self.seed = seed
        self.shape = shape
        self.reject_every = reject_every
        self.listeners: list[Listener] = []
        self.frames: list[dict[str, Any]] = []
        self.stacks: dict[str, dict[str, Any]] = {}
        self.products: dict[str, dict[str, Any]] = {}
        self._sum: dict[str, np.ndarray] = {}
        self.actions: list[tuple[str, Any]] = []
        self.warnings: list[str] = []
        self.started_at = "2026-11-21T20:00:00Z"
        self.t0 = 1_790_000_000.0
        self.sky = star_field(shape, seed=seed)
        self.default_stack = self.add_stack(target, filter)
        self.masters = [
            {"kind": "bias", "camera": "ZWO ASI2600MM", "gain": 100, "offset": 50, "binning": "1x1",
             "temperature_c": -10.0, "exposure_s": 0.0, "filter": "", "ncombine": 50, "age_days": 12.5,
             "name": "bias_g100_o50_m10C.fits"},
            {"kind": "dark", "camera": "ZWO ASI2600MM", "gain": 100, "offset": 50, "binning": "1x1",
             "temperature_c": -10.0, "exposure_s": 300.0, "filter": "", "ncombine": 30, "age_days": 12.4,
             "name": "dark_300s_g100_m10C.fits"},
            {"kind": "flat", "camera": "ZWO ASI2600MM", "gain": 100, "offset": 50, "binning": "1x1",
             "temperature_c": -10.0, "exposure_s": 1.2, "filter": "L", "ncombine": 40, "age_days": 0.3,
             "name": "flat_L.fits"},
        ]

    # -- helpers used by tests -----------------------------------------------------------------

    def add_stack(self, target: str, filter: str) -> str:
        sid = f"s{len(self.stacks) + 1}"
        self.stacks[sid] = {"id": sid, "target": target, "filter": filter, "ncombine": 0, "exposure_s": 0.0,
                            "reference": None, "version": 0, "rejected": 0}
        self._sum[sid] = np.zeros(self.shape, dtype=np.float64)
        return sid

    def emit(self, type_: str, data: dict[str, Any]) -> None:
        event = {"type": type_, "data": data, "ts": time.time()}
        for cb in list(self.listeners):
            cb(event)

    def add_frame(self, *, stack_id: str | None = None, rejected: bool | None = None) -> dict[str, Any]:
        """One more light; returns its record (events emitted synchronously)."""
        sid = stack_id or self.default_stack
        st = self.stacks[sid]
        i = len(self.frames)
        if rejected is None:
            rejected = self.reject_every > 0 and i % self.reject_every == self.reject_every - 1
        rng = self.rng
        fwhm = float(2.6 + 0.3 * math.sin(i / 5) + 0.05 * rng.standard_normal())
        stars = int(rng.integers(8, 14)) if rejected else int(380 + 40 * math.cos(i / 7) + rng.integers(-10, 10))
        name = f"{st['target']}_{st['filter']}_300s_{i + 1:04d}.fits"
        rec: dict[str, Any] = {
            "id": i + 1,
            "path": f"/data/capture/{name}",
            "name": name,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.t0 + 310 * i)),
            "target": st["target"],
            "filter": st["filter"],
            "exposure_s": 300.0,
            "fwhm_px": fwhm,
            "fwhm_arcsec": fwhm * 1.21,
            "eccentricity": float(0.35 + 0.05 * rng.standard_normal()),
            "stars": stars,
            "background": float(0.05 + 0.002 * i + 0.001 * rng.standard_normal()),
            "noise": float(0.004 + 0.0002 * rng.standard_normal()),
            "weight": float(0.9 + 0.1 * rng.standard_normal()) if not rejected else float("nan"),
            "scale": float(1.0 + 0.03 * rng.standard_normal()) if not rejected else 1.6,
            "status": "rejected" if rejected else "stacked",
            "reason": "few_stars: stars < 15 (cloud)" if rejected else "",
            "masters": {"bias": "bias_g100_o50_m10C.fits (gain, offset match)",
                        "dark": "dark_300s_g100_m10C.fits (exposure 300 s, -10.0 C)",
                        "flat": "flat_L.fits (same night, filter L)"},
            "transform": [[1.0, 0.0, float(rng.normal(0, 3))], [0.0, 1.0, float(rng.normal(0, 3))]],
            "stack_id": sid,
            "excluded": False,
        }
        self.frames.append(rec)
        self.emit("frame_received", {"id": rec["id"], "name": name, "path": rec["path"]})
        if self.full_events:
            self.emit("frame_processed", rec)
        else:  # what the real service sends: the verdict; the page reads the metrics from /api/frames
            self.emit("frame_processed", {"id": rec["id"], "path": rec["path"], "name": name, "kind": "light",
                                          "status": rec["status"], "reason": rec["reason"], "stack_id": sid,
                                          "elapsed_s": 0.8, "latency_s": 1.1})
        if not rejected:
            self._stack_frame(sid, i)
        return rec

    def _stack_frame(self, sid: str, i: int) -> None:
        st = self.stacks[sid]
        frame = self.sky + 0.02 * np.random.default_rng(1000 + i).standard_normal(self.shape)
        self._sum[sid] += frame
        st["ncombine"] += 1
        st["exposure_s"] += 300.0
        st["version"] += 1
        if st["reference"] is None:
            st["reference"] = self.frames[i]["id"]
        n = st["ncombine"]
        image = (self._sum[sid] / n).astype(np.float32)
        image[:, :3] = np.nan  # a strip outside every footprint
        coverage = np.full(self.shape, n, dtype=np.uint16)
        coverage[:, :3] = 0
        rej_high = np.zeros(self.shape, dtype=np.uint16)
        rej_high[self.shape[0] // 3, :] = min(n, 3)  # a satellite trail rejected
        rej_low = np.zeros(self.shape, dtype=np.uint16)
        rej_low[::37, ::41] = 1
        self.products[sid] = {"version": st["version"], "image": image, "rej_low": rej_low, "rej_high": rej_high,
                              "coverage": coverage,
                              "header": {"OBJECT": st["target"], "FILTER": st["filter"], "NCOMBINE": n,
                                         "EXPTIME": st["exposure_s"], "BAD KEY": 1, "NANVAL": float("nan")}}
        self.emit("stack_updated", {"id": sid, "version": st["version"], "ncombine": n,
                                    "target": st["target"], "filter": st["filter"]})

    async def run_night(self, n: int, interval_s: float, *, stack_id: str | None = None) -> None:
        for _ in range(n):
            self.add_frame(stack_id=stack_id)
            await asyncio.sleep(interval_s)

    # -- ServiceView ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        seen = len(self.frames)
        rejected = sum(1 for f in self.frames if f["status"] == "rejected")
        return {
            "frames": {"seen": seen, "stacked": seen - rejected, "rejected": rejected, "failed": 0, "pending": 0},
            "queue": {"pending": 0, "lag_s": 0.4},
            "activity": "idle" if not self.frames else f"stacked {self.frames[-1]['name']}",
            "library": {"masters": len(self.masters), "bias": 1, "dark": 1, "flat": 1, "darkflat": 0},
            "warnings": list(self.warnings),
            "stacks": self.list_stacks(),
            "version": "0.1.0-fake",
            "started_at": self.started_at,
        }

    def list_frames(self, *, stack_id: str | None = None, status: str | None = None, offset: int = 0,
                    limit: int = 100) -> dict[str, Any]:
        sel = [f for f in self.frames if (stack_id is None or f["stack_id"] == stack_id)
               and (status is None or f["status"] == status)]
        return {"total": len(sel), "frames": sel[offset: offset + limit]}

    def list_stacks(self) -> list[dict[str, Any]]:
        return [dict(s) for s in self.stacks.values()]

    def stack_products(self, stack_id: str) -> dict[str, Any] | None:
        return self.products.get(stack_id)

    def list_masters(self) -> list[dict[str, Any]]:
        return list(self.masters)

    def add_listener(self, callback: Listener) -> None:
        self.listeners.append(callback)

    def remove_listener(self, callback: Listener) -> None:
        self.listeners.remove(callback)

    async def exclude_frame(self, frame_id: int, excluded: bool) -> dict[str, Any]:
        for f in self.frames:
            if f["id"] == frame_id:
                f["excluded"] = excluded
                self.actions.append(("exclude", (frame_id, excluded)))
                self.emit("frame_processed", f)
                return {"id": frame_id, "excluded": excluded}
        raise KeyError(frame_id)

    async def set_reference(self, stack_id: str, frame_id: int) -> dict[str, Any]:
        if stack_id not in self.stacks:
            raise KeyError(stack_id)
        frame = next((f for f in self.frames if f["id"] == frame_id), None)
        if frame is None:
            raise KeyError(frame_id)
        if frame["status"] != "stacked":
            raise ValueError(f"frame {frame_id} is {frame['status']} and cannot be the reference")
        self.stacks[stack_id]["reference"] = frame_id
        self.actions.append(("reference", (stack_id, frame_id)))
        return {"stack_id": stack_id, "reference": frame_id}

    async def new_stack(self, target: str, filter: str) -> dict[str, Any]:
        if not target:
            raise ValueError("target must not be empty")
        sid = self.add_stack(target, filter)
        self.actions.append(("new_stack", (target, filter)))
        return {"id": sid}

    async def reintegrate(self, stack_id: str) -> dict[str, Any]:
        if stack_id not in self.stacks:
            raise KeyError(stack_id)
        self.actions.append(("reintegrate", stack_id))
        return {"stack_id": stack_id, "queued": True}
