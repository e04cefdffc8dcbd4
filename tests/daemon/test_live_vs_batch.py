"""Live vs batch after every frame of a simulated night, as the service runs it (issue #5).

The lights go one by one through the real pipeline; after each one the exact pass runs when the
service's policy (`service.exact_pass_due`, frames two minutes apart) says so, and the live image is
compared with the batch integration of the same stored frames (§7.5's algorithm, the stack's noise
model as rejection floor, large-scale rejection: what `stackwatch stack` runs). Small frames: the pass
is cheap, so the service runs it after every frame and the live image is the batch result. Without
the passes the live stack alone differs (single borderline decisions: RMS < 0.1σ, max 3-4σ of the
stack's noise; bench/eval_live_vs_batch.py has the figures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from stackwatch.daemon.config import Config
from stackwatch.daemon.pipeline import Pipeline, classify_paths
from stackwatch.daemon.service import exact_pass_due
from stackwatch.engine.integrate import NpySource, integrate
from stackwatch.engine.reject import auto_rejection

from tests.nights import small_night


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_night(tmp_path_factory.mktemp("night"), n_lights=9, seed=5, trails=(0, 3), clouds=((5, 0.6),),
                       stars_per_mpix=20000.0)


def _run(night: Path, state: Path, config: Config) -> list[tuple[int, bool, float]]:
    """(frames, exact pass run, max |live − batch| relative to the batch's noise) after each light."""
    pipe = Pipeline(config, state)
    files = classify_paths([night])
    pipe.library.add_frames([str(p) for p, i, _ in files if i is not None and i.is_calibration], rebuild=False)
    pipe.flush_masters()
    lights = sorted(((p, i) for p, i, _ in files if i is not None and i.kind == "light"),
                    key=lambda pi: str(pi[1].date_obs))
    out, new = [], 0
    try:
        for path, info in lights:
            pipe.process_light(path, info)
            (stack,) = pipe._stacks.values()
            live = stack.live
            if live is None or live.n_frames == 0:
                continue
            new += 1
            ran = exact_pass_due(new_frames=new, stack_frames=live.n_frames,
                                 estimate_s=pipe.exact_pass_estimate_s(stack.id), gap_s=120.0, quiet=False,
                                 live=config.live)
            if ran:
                pipe.finalize(stack.id)
                new = 0
            (summary,) = pipe.stacks()
            assert summary["exact"] is ran  # what /api/stacks tells the web view
            pipe.flush_store()
            ids = list(live.frame_ids)
            weights = [next(f.weight for f in live.frames if f.frame_id == fid) for fid in ids]
            name, params = auto_rejection(len(ids))
            batch = integrate([NpySource(pipe.frames_dir / stack.id / f"{fid}.npy") for fid in ids],
                              weights=weights, rejection=name, params=params, noise_model=live.noise_model(ids),
                              large_scale=config.integration.large_scale_rejection)
            img = np.asarray(batch.image, np.float32)
            lv = live.image()
            assert np.array_equal(np.isnan(lv), np.isnan(img))
            ok = np.isfinite(img)
            sigma = float(np.std(np.diff(img[ok].reshape(-1)[: (ok.sum() // 2) * 2].reshape(-1, 2), axis=1))) / np.sqrt(2)
            out.append((len(ids), ran, float(np.abs(lv[ok] - img[ok]).max()) / sigma))
    finally:
        pipe.close()
    return out


def test_service_policy_keeps_the_live_image_equal_to_batch_after_every_frame(night: Path, tmp_path: Path) -> None:
    rows = _run(night, tmp_path / "service", Config())
    print(rows)
    assert len(rows) >= 8
    assert all(ran for _, ran, _ in rows)
    assert all(dev == 0.0 for _, _, dev in rows), rows
    # the live stack alone (no pass after any frame) is not the batch result from 5 frames on
    alone = Config()
    alone.live.exact_pass_max_s = alone.live.exact_pass_gap_fraction = 0.0
    alone.live.exact_pass_early_frames, alone.live.exact_pass_frames = 0, 10**6
    rows = _run(night, tmp_path / "alone", alone)
    print(rows)
    assert not any(ran for _, ran, _ in rows)
    assert max(dev for _, _, dev in rows) > 0.01
