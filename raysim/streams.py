"""Seeded random streams keyed by what they are for.

Every random draw in a run comes from ``stream(seed, PURPOSE, *keys)``, e.g.
``stream(seed, TRAIN, sensor_id, round_index)``, so results never depend on
how many client actors there are, which one trains a sensor, or in what order.
"""

from __future__ import annotations

import numpy as np

COHORT = 0xC0407  # per round: which sensors are selected
TRAIN = 0x7A1E  # per sensor and round: local batch order
CLOCK = 0xC10C  # per sensor and round: transfer losses and retries
PROFILE = 0x9F0F  # per sensor: speed and bandwidth drawn from the tier
AVAILABILITY = 0xA7A1  # per sensor and block: the on/off process


def stream(seed: int, purpose: int, *keys: int) -> np.random.Generator:
    """An independent generator for (seed, purpose, keys...)."""
    # Keys are taken modulo 2**64 so negative ids (allowed in user data) seed fine.
    return np.random.default_rng([int(seed), int(purpose), *(int(k) & _MASK for k in keys)])


_MASK = (1 << 64) - 1
