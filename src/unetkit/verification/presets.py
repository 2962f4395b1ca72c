"""How much verify runs: timesteps compared, sampling-loop steps (LCM: its own step count). Kept apart, without
torch, so that ``unetkit verify --help`` can quote it."""

PRESETS: dict[str, dict[str, int]] = {
    "default": {"timesteps": 10, "steps": 20, "lcm_steps": 4},
    "quick": {"timesteps": 2, "steps": 3, "lcm_steps": 2},
}
