"""Small simulated nights for the pipeline's tests (seeded, written where the test asks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stackwatch.engine import simulate


def small_night(out: Path, *, n_lights: int, seed: int, calibration: int = 3, **spec: Any) -> Path:
    """A 512x384 night of `n_lights` lights and `calibration` frames of each calibration kind,
    without truth files; `spec` overrides the preset (trails, clouds, stars_per_mpix...)."""
    night = simulate.preset("small", n_lights=n_lights, n_darks=calibration, n_flats=calibration,
                            n_darkflats=calibration, n_biases=calibration, seed=seed, **spec)
    simulate.simulate_night(night, out, truth_files=False)
    return out
