"""Lights calibrated by another program and other programs' masters in the watched folder: no step is
applied twice, the missing ones are, and a foreign master never joins our raw masters. Real pipeline on
a small simulated night; the headers are written here as MaxIm DL, PixInsight and Siril write them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from stackwatch.daemon.config import Config
from stackwatch.daemon.pipeline import Pipeline, classify_paths
from stackwatch.engine import fitsio
from stackwatch.engine.calibrate import calibrate_light
from stackwatch.engine.classify import classify
from stackwatch.engine.errors import FrameError

from tests.nights import small_night


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_night(tmp_path_factory.mktemp("night"), n_lights=4, seed=41, trails=(), stars_per_mpix=30000.0)


def _pipeline(night: Path, state: Path) -> Pipeline:
    config = Config()
    config.normalization.reference_candidates = 2
    # cosmetic correction takes its defect map from the dark actually applied: off, the comparison
    # below is of the calibration alone
    config.calibration.cosmetic = False
    pipe = Pipeline(config, state)
    for kind in ("biases", "darks", "darkflats", "flats"):
        for path, info, _ in classify_paths([night / kind]):
            assert info is not None
            pipe.add_calibration(path, info)
    pipe.flush_masters()
    return pipe


def _lights(night: Path) -> list[Path]:
    found = [(p, info) for p, info, _ in classify_paths([night / "lights"]) if info is not None]
    return [p for p, info in sorted(found, key=lambda pi: pi[1].date_obs)]  # type: ignore[union-attr]


def _write_maxim(raw_path: Path, data: np.ndarray, out: Path, calstat: str) -> Path:
    """A light as MaxIm DL saves a calibrated frame: float ADU with PEDESTAL -100 and CALSTAT."""
    header = fits.getheader(raw_path)
    for key in ("BZERO", "BSCALE", "BITPIX"):
        header.remove(key, ignore_missing=True)
    header["CALSTAT"] = (calstat, "Calibration status")
    header["PEDESTAL"] = (-100.0, "Correction to add for zero-based ADU")
    fits.PrimaryHDU(data=(data * 65535.0 + 100.0).astype(np.float32), header=header).writeto(out)
    return out


def test_maxim_calibrated_lights_are_not_calibrated_twice(night: Path, tmp_path: Path) -> None:
    pipe = _pipeline(night, tmp_path / "state")
    try:
        raws = _lights(night)
        folder = tmp_path / "maxim"
        folder.mkdir()
        for raw in raws:
            image = fitsio.read_image(raw)
            ms = pipe.library.match(classify(image.header, str(raw)))
            assert ms.dark is not None and ms.flat is not None and ms.dark_scale == 1.0
            load = pipe.library.load
            once = calibrate_light(image, bias=load(ms.bias) if ms.bias else None, dark=load(ms.dark),
                                   flat=load(ms.flat), flat_scale_override=pipe.library.flat_scale(ms.flat))
            bdf = _write_maxim(raw, once.data, folder / f"BDF_{raw.name}", "BDF")
            dark_only = calibrate_light(image, dark=load(ms.dark))
            bd = _write_maxim(raw, dark_only.data, folder / f"BD_{raw.name}", "BD")
            reference = pipe._calibrate(str(raw)).data
            got_bdf = pipe._calibrate(str(bdf))
            got_bd = pipe._calibrate(str(bd))
            # the raw light calibrated once by the pipeline is the truth for both
            assert np.nanmax(np.abs(got_bdf.data - reference)) < 2e-6
            assert np.nanmax(np.abs(got_bd.data - reference)) < 2e-6
            assert got_bdf.masters.dark is None and got_bdf.masters.flat is None and got_bdf.masters.bias is None
            assert got_bd.masters.dark is None and got_bd.masters.flat == ms.flat
            assert not got_bdf.masters.missing and not got_bd.masters.missing
            assert any("already calibrated by another program (MaxIm DL CALSTAT 'BD')" in n for n in got_bd.notes)
        # through the real pipeline: stacked, and the record says what was not applied again
        for path in sorted(folder.glob("BDF_*")):
            rec = pipe.process_light(path, classify(fitsio.read_header(str(path)), str(path)))
            assert rec["status"] == "stacked", rec
            assert rec["masters"]["dark"] == "already applied by another program (MaxIm DL CALSTAT 'BDF')"
            assert rec["masters"]["flat"].startswith("already applied")
            assert not rec["provisional"]
            assert rec["notes"][0].startswith("already calibrated by another program")
    finally:
        pipe.close()


def test_bias_subtracted_light_gets_the_dark_without_its_bias(night: Path, tmp_path: Path) -> None:
    """CALSTAT 'B' (MaxIm) / Siril's "Calibrated with a master bias": the dark is applied as D - B,
    which needs the master bias even for an exposure-matched dark."""
    pipe = _pipeline(night, tmp_path / "state")
    try:
        raw = _lights(night)[0]
        image = fitsio.read_image(raw)
        ms = pipe.library.match(classify(image.header, str(raw)))
        assert ms.bias is not None
        bias = pipe.library.load(ms.bias)
        out = tmp_path / "siril_b.fits"
        header = fits.getheader(raw)
        for key in ("BZERO", "BSCALE", "BITPIX"):
            header.remove(key, ignore_missing=True)
        header.add_history("Calibrated with a master bias")
        fits.PrimaryHDU(data=((image.data - bias) * 65535.0).astype(np.float32), header=header).writeto(out)
        got = pipe._calibrate(str(out))
        assert got.info.calibrated == ("bias",)
        assert got.masters.bias == ms.bias and got.masters.dark == ms.dark and got.masters.flat == ms.flat
        reference = pipe._calibrate(str(raw)).data
        # float ADU of a bias-subtracted frame: a few 1e-7 of full scale from rounding
        assert np.nanmax(np.abs(got.data - reference)) < 2e-6
    finally:
        pipe.close()


def test_a_foreign_master_dark_does_not_change_our_master(night: Path, tmp_path: Path) -> None:
    pipe = _pipeline(night, tmp_path / "state")
    try:
        (before,) = [m for m in pipe.masters() if m["kind"] == "dark"]
        data_before = pipe.library.load(pipe.library.masters()[[m.kind for m in pipe.library.masters()].index("dark")])
        dark_path = next(p for p, info, _ in classify_paths([night / "darks"]) if info is not None)
        header = fits.getheader(dark_path)
        for key in ("BZERO", "BSCALE", "BITPIX"):
            header.remove(key, ignore_missing=True)
        header["NCOMBINE"] = 25
        foreign = fitsio.read_image(dark_path).data * 65535.0 - 300.0  # bias-subtracted, as MaxIm's are
        cases = {
            "pixinsight.fits": {"IMAGETYP": "Master Dark"},  # WBPP: IMAGETYP 'Master Dark', NCOMBINE
            "master_dark_300s.fits": {"IMAGETYP": "Dark Frame"},  # a raw type, but the name says master
            "integration.fits": {"IMAGETYP": "Dark Frame"},  # ImageIntegration's output: NCOMBINE > 1
        }
        for name, cards in cases.items():
            h = header.copy()
            h.update(cards)
            path = tmp_path / name
            fits.PrimaryHDU(data=foreign.astype(np.float32), header=h).writeto(path)
            info = classify(fitsio.read_header(str(path)), str(path))
            assert info.kind == "dark" and info.foreign_master
            with pytest.raises(FrameError, match="ignored: a master dark integrated by another program"):
                pipe.add_calibration(path, info)
        pipe.flush_masters()
        (after,) = [m for m in pipe.masters() if m["kind"] == "dark"]
        assert after == before
        data_after = pipe.library.load(pipe.library.masters()[[m.kind for m in pipe.library.masters()].index("dark")])
        assert np.array_equal(data_before, data_after)
    finally:
        pipe.close()
