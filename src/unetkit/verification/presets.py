"""How much verify runs: timesteps compared, sampling-loop steps (LCM: its own step count), and the bounds of every
setting, checked in one place before any model is loaded. Kept apart, without torch, so that ``unetkit verify
--help`` can quote it."""

from __future__ import annotations

import math

from unetkit.errors import UnetkitError

PRESETS: dict[str, dict[str, int]] = {
    "default": {"timesteps": 10, "steps": 20, "lcm_steps": 4},
    "quick": {"timesteps": 2, "steps": 3, "lcm_steps": 2},
}

#: the most timesteps or sampling steps a run may ask for (a diffusion schedule has 1000 training timesteps)
MAX_STEPS = 1000
MAX_SIZE = 512  # latents of 4096 px
MAX_BATCH = 64


def check_settings(
    *,
    timesteps: int | None = None,
    steps: int | None = None,
    size: int = 64,
    batch: int = 1,
    guidance: float | None = None,
    min_sqnr: float | None = None,
) -> None:
    """Refuse settings that cannot run or would run without end, with the allowed range."""
    problems = []
    for name, value in (("timesteps", timesteps), ("steps", steps)):
        if value is not None and not 1 <= value <= MAX_STEPS:
            problems.append(f"{name}={value} (1 to {MAX_STEPS})")
    if not (8 <= size <= MAX_SIZE and size % 8 == 0):
        problems.append(f"size={size} (a multiple of 8 from 8 to {MAX_SIZE}: the UNet downsamples three times)")
    if not 1 <= batch <= MAX_BATCH:
        problems.append(f"batch={batch} (1 to {MAX_BATCH})")
    if guidance is not None and not (math.isfinite(guidance) and guidance > 0):
        problems.append(f"guidance={guidance} (a finite number above 0)")
    if min_sqnr is not None and not math.isfinite(min_sqnr):
        problems.append(f"min_sqnr={min_sqnr} (a finite number of dB)")
    if problems:
        raise UnetkitError("verify settings out of range: " + "; ".join(problems))
