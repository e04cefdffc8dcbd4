"""The pipeline's state over a night: per-frame persistence of fixed size, crash-safe members log,
provisional frames (stacked before their masters) cleared by the recalibration. Real pipeline on a
small simulated night."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from stackwatch.daemon import pipeline as pipeline_mod
from stackwatch.daemon.config import Config
from stackwatch.daemon.pipeline import Pipeline, classify_paths

from tests.nights import small_night


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_night(tmp_path_factory.mktemp("night"), n_lights=7, seed=31, trails=(), stars_per_mpix=30000.0)


def _lights(folder: Path) -> list[tuple[Path, object]]:
    out = [(p, info) for p, info, err in classify_paths([folder / "lights"]) if info is not None]
    return sorted(out, key=lambda pi: pi[1].date_obs)  # type: ignore[attr-defined]


def _calibration(folder: Path, *kinds: str) -> list[tuple[Path, object]]:
    return [(p, info) for k in kinds for p, info, _ in classify_paths([folder / k]) if info is not None]


def _config() -> Config:
    config = Config()
    config.normalization.reference_candidates = 3  # a settled reference after three frames
    return config


def _stack_folder(state: Path) -> Path:
    (stack_json,) = state.glob("stacks/*/stack.json")
    return stack_json.parent


def test_stack_json_stays_small_and_the_log_restores_the_stack(night: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    pipe = Pipeline(_config(), state)
    for path, info in _calibration(night, "biases", "darks", "darkflats", "flats"):
        pipe.add_calibration(path, info)
    sizes = []
    for path, info in _lights(night):
        rec = pipe.process_light(path, info)
        assert rec["status"] in ("stacked", "rejected"), rec
        sizes.append((_stack_folder(state) / "stack.json").stat().st_size)
    # the reference is settled after 3 candidates: from then on stack.json does not grow with the members
    assert max(sizes[3:]) - min(sizes[3:]) < 64, sizes
    (summary,) = pipe.stacks()
    members = pipe.members(summary["id"])
    history = list(pipe._stacks[summary["id"]].history)
    # the service runs the exact pass after every frame while it is this cheap (small frames)
    est = pipe.exact_pass_estimate_s(summary["id"])
    live = pipe._stacks[summary["id"]].live
    assert live is not None and 0 < est < 1.0
    assert est == pytest.approx(live.n_frames * np.prod(live.shape) * pipeline_mod._EXACT_NS_PER_SAMPLE * 1e-9
                                * pipeline_mod._LARGE_SCALE_FACTOR)
    assert pipe.exact_pass_estimate_s("no-such-stack") == float("inf")
    pipe.checkpoint()
    # an unchanged live stack is not written again (0.8 GB each at 26 MP, one per target and filter)
    manifest = _stack_folder(state) / "live" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    pipe.checkpoint()
    assert manifest.stat().st_mtime_ns == before
    pipe.close()
    logs = list(_stack_folder(state).glob("members-*.jsonl"))
    assert len(logs) == 1  # older generations removed
    again = Pipeline(_config(), state)
    try:
        (summary2,) = again.stacks()
        assert {k: summary2[k] for k in ("ncombine", "frames", "rejected", "failed", "exposure_s", "reference")} == {
            k: summary[k] for k in ("ncombine", "frames", "rejected", "failed", "exposure_s", "reference")}
        assert again.members(summary["id"]) == members
        assert again._stacks[summary["id"]].history == history
        assert not summary2["stale"]
    finally:
        again.close()


def test_uncommitted_log_tail_is_cut_and_the_frame_redone(night: Path, tmp_path: Path) -> None:
    """A crash after the members log was appended and before stack.json: the tail is not trusted."""
    state = tmp_path / "state"
    lights = _lights(night)
    pipe = Pipeline(_config(), state)
    for path, info in _calibration(night, "biases", "darks", "darkflats", "flats"):
        pipe.add_calibration(path, info)
    for path, info in lights[:-1]:
        pipe.process_light(path, info)
    pipe.checkpoint()
    folder = _stack_folder(state)
    committed = json.loads((folder / "stack.json").read_text())["log"]
    (log,) = folder.glob("members-*.jsonl")
    assert log.stat().st_size == committed["bytes"]
    stack_json = (folder / "stack.json").read_bytes()
    path, info = lights[-1]
    last = pipe.process_light(path, info)
    pipe.close()
    (folder / "stack.json").write_bytes(stack_json)  # stack.json as it was before the last frame
    assert log.stat().st_size > committed["bytes"]
    again = Pipeline(_config(), state)
    try:
        assert log.stat().st_size == committed["bytes"]
        (summary,) = again.stacks()
        assert summary["frames"] == len(lights) - 1 and not summary["stale"]
        redo = again.process_light(path, info)  # the service re-queues the frame in flight
        assert (redo["status"], redo.get("weight")) == (last["status"], last.get("weight"))
        assert again.stacks()[0]["ncombine"] == summary["ncombine"] + (last["status"] == "stacked")
    finally:
        again.close()


def test_lights_before_their_flat_are_provisional_until_recalibrated(night: Path, tmp_path: Path) -> None:
    pipe = Pipeline(_config(), tmp_path / "state")
    try:
        for path, info in _calibration(night, "biases", "darks"):
            pipe.add_calibration(path, info)
        lights = _lights(night)[:4]
        records = [pipe.process_light(p, i) for p, i in lights]
        stacked = [r for r in records if r["status"] == "stacked"]
        assert stacked and all(r["provisional"] for r in stacked), records
        assert all("flat" in r["masters"]["missing"] for r in stacked)
        assert pipe.frames_needing_recalibration() == []  # nothing better exists yet
        for path, info in _calibration(night, "darkflats", "flats"):
            pipe.add_calibration(path, info)
        paths = pipe.frames_needing_recalibration()
        assert sorted(paths) == sorted(str(p) for p, _ in lights)
        after = pipe.recalibrate(paths)
        assert len(after) == len(lights)
        assert not any(r["provisional"] for r in after), after
        assert all(r["masters"].get("flat") for r in after if r["status"] == "stacked")
        assert not pipe.stacks()[0]["stale"]
    finally:
        pipe.close()


def test_prefetched_light_is_used_only_while_the_file_is_unchanged(night: Path, tmp_path: Path) -> None:
    import numpy as np
    from stackwatch.engine import fitsio

    (first, _), (second, _) = _lights(night)[:2]
    target = tmp_path / "light.fits"
    target.write_bytes(first.read_bytes())
    pipe = Pipeline(_config(), tmp_path / "state")
    try:
        pipe.prefetch(target)
        assert pipe._take_prefetched(str(tmp_path / "other.fits")) is None  # another file: dropped
        pipe.prefetch(target)
        image = pipe._take_prefetched(str(target))
        assert image is not None and np.array_equal(image.data, fitsio.read_image(target).data, equal_nan=True)
        assert pipe._take_prefetched(str(target)) is None  # taken once
        pipe.prefetch(target)
        assert pipe._prefetched is not None
        pipe._prefetched[2].result()
        target.write_bytes(second.read_bytes())  # rewritten after the read: read again by the caller
        assert pipe._take_prefetched(str(target)) is None
    finally:
        pipe.close()


def _final_image(pipe: Pipeline, stack_id: str, out: Path) -> np.ndarray:
    from astropy.io import fits

    pipe.finalize(stack_id, out)
    return np.asarray(fits.getdata(out), np.float64)


def test_frame_store_budget_evicts_and_the_exact_pass_recomputes_from_raw(night: Path, tmp_path: Path) -> None:
    """Over `frame_store_budget_gb` the oldest stored frames are evicted (never the reference); the live
    image is untouched and the exact pass recomputes them from the raw files: the same product, to the
    bit, as with an unlimited store. A raw file that changed since makes the stack rebuild instead."""
    cal = _calibration(night, "biases", "darks", "darkflats", "flats")
    lights = _lights(night)

    def run(state: Path, budget_gb: float) -> Pipeline:
        config = _config()
        config.live.frame_store_budget_gb = budget_gb
        pipe = Pipeline(config, state)
        for path, info in cal:
            pipe.add_calibration(path, info)
        for path, info in lights:
            pipe.process_light(path, info)
        return pipe

    full = run(tmp_path / "full", 0.0)  # <= 0: no limit
    (s_full,) = full.stacks()
    frame_bytes = max(full._store_bytes[s_full["id"]].values())
    budget_frames = 3
    tight = run(tmp_path / "tight", budget_frames * frame_bytes / 1e9)
    try:
        (s_tight,) = tight.stacks()
        sid = s_tight["id"]
        assert s_tight["ncombine"] == s_full["ncombine"] >= 5
        store = tmp_path / "tight" / "frames" / sid
        stored = [f for f in store.glob("*.npy") if not f.name.endswith(".sat.npy")]
        assert len(stored) <= budget_frames
        assert s_tight["store_bytes"] <= budget_frames * frame_bytes
        assert s_tight["evicted"] == s_full["ncombine"] - len(stored) > 0
        ref_id = tight._stacks[sid].reference.frame_id  # type: ignore[union-attr]
        assert (store / f"{ref_id}.npy").exists()
        # the live image does not depend on the store
        np.testing.assert_array_equal(tight.stack_products(sid)["image"], full.stack_products(sid)["image"])  # type: ignore[index]
        # the exact pass recomputes the evicted frames: bit-identical product
        a = _final_image(full, sid, tmp_path / "full.fits")
        b = _final_image(tight, sid, tmp_path / "tight.fits")
        np.testing.assert_array_equal(a, b)
        # and evicts again afterwards
        assert tight.stacks()[0]["store_bytes"] <= budget_frames * frame_bytes
        # the estimate counts the recomputation
        assert tight.exact_pass_estimate_s(sid) > full.exact_pass_estimate_s(sid)
        tight.checkpoint()  # (without a live checkpoint a restart re-applies, hence recomputes, every frame)
    finally:
        tight.close()
        full.close()
    # after a restart the evicted frames are still known; a raw file that changed since it was stacked
    # cannot be recomputed: the exact pass rebuilds the stack from the raw files instead
    again = Pipeline(_config(), tmp_path / "tight")
    try:
        stack = again._stacks[sid]
        victim = next(m for m in stack.members if m.get("evicted"))
        assert again._recomputable(stack, victim)
        Path(victim["path"]).touch()
        assert not again._recomputable(stack, victim)
        again.config.live.frame_store_budget_gb = 0.0
        c = _final_image(again, sid, tmp_path / "again.fits")
        np.testing.assert_allclose(c, a, rtol=1e-6, atol=1e-7, equal_nan=True)
        assert again.stacks()[0]["evicted"] == 0
    finally:
        again.close()


def test_store_frames_lost_to_a_power_cut_are_recomputed(night: Path, tmp_path: Path) -> None:
    """The frame store is written without fsync: after a power cut a stored frame may be missing or cut
    short. The next start finds them, marks them for recomputation from their raw files, and the exact
    pass gives the same product, to the bit."""
    state = tmp_path / "state"
    pipe = Pipeline(_config(), state)
    for path, info in _calibration(night, "biases", "darks", "darkflats", "flats"):
        pipe.add_calibration(path, info)
    for path, info in _lights(night):
        pipe.process_light(path, info)
    (summary,) = pipe.stacks()
    sid = summary["id"]
    before = _final_image(pipe, sid, tmp_path / "before.fits")
    pipe.checkpoint()
    ref_id = pipe._stacks[sid].reference.frame_id  # type: ignore[union-attr]
    pipe.close()
    frames = sorted(f for f in (state / "frames" / sid).glob("*.npy")
                    if not f.name.endswith(".sat.npy") and f.stem != ref_id)
    assert len(frames) >= 3
    frames[0].unlink()  # the rename never reached the disk
    with open(frames[1], "r+b") as fh:  # the data never did
        fh.truncate(frames[1].stat().st_size // 2)
    again = Pipeline(_config(), state)
    try:
        assert again.stacks()[0]["evicted"] == 2
        assert not again.stacks()[0]["stale"]
        after = _final_image(again, sid, tmp_path / "after.fits")
        np.testing.assert_array_equal(after, before)
        assert frames[0].exists() and frames[1].exists()
    finally:
        again.close()


def test_a_failed_store_write_raises_at_the_next_frame_and_the_frame_is_recomputed(
        night: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The frame store is written in the background (overlapping the next frame's read). A write that
    fails (a full disk) raises at the next frame, before that frame changes anything, and leaves its frame
    marked for recomputation: the next frames go on and the exact pass gives the same product."""
    import errno

    from stackwatch.daemon import pipeline as pl

    cal = _calibration(night, "biases", "darks", "darkflats", "flats")
    lights = _lights(night)
    ref_pipe = Pipeline(_config(), tmp_path / "ref")
    for path, info in cal:
        ref_pipe.add_calibration(path, info)
    for path, info in lights:
        ref_pipe.process_light(path, info)
    (summary,) = ref_pipe.stacks()
    sid = summary["id"]
    expected = _final_image(ref_pipe, sid, tmp_path / "ref.fits")
    ref_pipe.close()

    pipe = Pipeline(_config(), tmp_path / "state")
    for path, info in cal:
        pipe.add_calibration(path, info)
    real_save = pl._timed_save_npy
    failed: list[Path] = []

    def flaky_save(path: Path, array: np.ndarray) -> float:
        if not failed and len(list(path.parent.glob("*.npy"))) >= 4:
            failed.append(path)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(path, array)

    monkeypatch.setattr(pl, "_timed_save_npy", flaky_save)
    try:
        raised = 0
        for path, info in lights:
            try:
                pipe.process_light(path, info)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                raised += 1
                pipe.process_light(path, info)  # the service retries once space is back
        assert failed and raised == 1
        assert not failed[0].exists()
        assert pipe.stacks()[0]["evicted"] == 1
        np.testing.assert_array_equal(_final_image(pipe, sid, tmp_path / "after.fits"), expected)
    finally:
        pipe.close()


def test_lights_without_a_target_name_are_grouped_by_field(tmp_path: Path) -> None:
    """OBJECT empty or a placeholder: lights are stacked per field they point at (dithers of a field
    together, two fields apart, one name for all filters), and the grouping survives a restart."""
    from astropy.io import fits
    from stackwatch.engine.classify import classify

    rng = np.random.default_rng(3)

    def light(i: int, ra: float, dec: float, obj: str, filt: str) -> tuple[Path, object]:
        h = fits.Header({"IMAGETYP": "Light Frame", "EXPTIME": 60.0, "FILTER": filt, "OBJECT": obj,
                         "RA": ra + rng.uniform(-0.08, 0.08), "DEC": dec + rng.uniform(-0.08, 0.08),
                         "DATE-OBS": f"2026-12-01T22:{i:02d}:00"})
        return tmp_path / f"l{i:02d}.fits", classify(h)

    frames = [light(i, 83.82, -5.39, ("Unknown", "", "undefined")[i % 3], "L") for i in range(6)]
    frames += [light(10 + i, 88.0, -5.0, "Unknown", "L") for i in range(3)]  # 4 deg away
    frames += [light(20 + i, 83.82, -5.39, "-", "Ha") for i in range(2)]
    state = tmp_path / "state"
    pipe = Pipeline(_config(), state)
    ids = [pipe.add_member(p, info) for p, info in frames]
    assert len(set(ids[:6])) == 1 and len(set(ids[6:9])) == 1 and ids[0] != ids[6]
    assert ids[0].startswith("field-05h35m-s05d") and ids[6].startswith("field-05h52m-s0")  # the first frame's pointing
    assert ids[9] == ids[0].replace("-l", "-ha") and len(set(ids[9:])) == 1
    pipe.checkpoint()
    pipe.close()
    again = Pipeline(_config(), state)
    p, info = light(30, 83.82, -5.39, "Unknown", "L")
    assert again.add_member(p, info) == ids[0]
    again.close()
