"""Seeded random streams keyed by what they are for.

Every random draw in a run comes from ``stream(seed, PURPOSE, *keys)``, e.g.
``stream(seed, TRAIN, sensor_id, round_index)``, so results never depend on
how many client actors there are, which one trains a sensor, or in what order.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

COHORT = 0xC0407  # per round: which sensors are selected
DISPATCH = 0xD15A  # async, per task number: which idle sensor is dispatched next
TRAIN = 0x7A1E  # per sensor and round: local batch order
CLOCK = 0xC10C  # per sensor and round: transfer losses and retries
PROFILE = 0x9F0F  # per sensor: speed and bandwidth drawn from the tier
AVAILABILITY = 0xA7A1  # per sensor and block: the on/off process
ATTACK = 0xA77C  # which sensors are malicious, and the noise they send
COMPRESS = 0xC0DE  # per sensor and task: a codec's stochastic rounding or random coordinates
PRIVACY = 0xD1FF  # central: per round, the server's noise; local: per sensor and task, the sensor's noise
PROXY = 0x9B0C  # per sensor and task: which proxy samples each local step adds (distillation, MMD)
CONTRIBUTION = 0xC047  # per round: the random orders of Monte-Carlo Shapley
DRIFT = 0xD21F  # per sensor: its calibration random walks; per sensor and round: a noisy fault's noise
HOLDOUT = 0x401D  # per sensor: which of its samples are kept aside for personalized evaluation


def stream(seed: int, purpose: int, *keys: int) -> np.random.Generator:
    """An independent generator for (seed, purpose, keys...)."""
    # Keys are taken modulo 2**64 so negative ids (allowed in user data) seed fine.
    return np.random.default_rng([int(seed), int(purpose), *(int(k) & _MASK for k in keys)])


_MASK = (1 << 64) - 1


# --------------------------------------------------------------------------- bulk seeding

# Constants of NumPy's SeedSequence (O'Neill's seed_seq alternative, numpy/random/bit_generator.pyx)
# and of PCG64's 128-bit LCG, which NumPy keeps stable so that seeded streams reproduce.
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = np.uint32(0xCA01F9DD), np.uint32(0x4973F715)
_POOL = 4
_PCG_MULT = (2549297995355413924 << 64) + 4865540595714422341
_M128 = (1 << 128) - 1


def keyed_streams(seed: int, purpose: int, keys: np.ndarray) -> Iterator[np.random.Generator]:
    """For each row of ``keys`` (shape (n, k), any int64), a generator equal to ``stream(seed, purpose, *row)``.

    Seeding tens of thousands of generators one by one spends most of its time
    in SeedSequence's hashing; here the hashing is vectorized over the rows and
    one generator is re-seeded per row. The yielded generator is the same
    object every time: draw from it before advancing the iterator.
    """
    keys = np.asarray(keys, dtype=np.int64)
    if keys.ndim != 2:
        raise ValueError(f"keys must be a 2-D array (rows, keys), got shape {keys.shape}")
    state, inc = _pcg64_seeds(seed, purpose, keys)
    rng = np.random.Generator(np.random.PCG64(0))
    bits = rng.bit_generator
    for s, i in zip(state, inc):
        bits.state = {"bit_generator": "PCG64", "state": {"state": s, "inc": i}, "has_uint32": 0, "uinteger": 0}
        yield rng


def _words(value: int) -> list[int]:
    """SeedSequence's split of a non-negative int into little-endian 32-bit words (0 is one word)."""
    words = [value & 0xFFFFFFFF]
    value >>= 32
    while value:
        words.append(value & 0xFFFFFFFF)
        value >>= 32
    return words


def _pcg64_seeds(seed: int, purpose: int, keys: np.ndarray) -> tuple[list[int], list[int]]:
    """PCG64 (state, inc) after seeding from SeedSequence([seed, purpose, *(row mod 2⁶⁴)]) for each row."""
    rows = len(keys)
    prefix = _words(int(seed)) + _words(int(purpose))
    unsigned = np.ascontiguousarray(keys).view(np.uint64)
    wide = unsigned > np.uint64(0xFFFFFFFF)  # keys that take two 32-bit words
    low = (unsigned & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    high = (unsigned >> np.uint64(32)).astype(np.uint32)
    pool = np.empty((rows, _POOL), dtype=np.uint32)
    # Rows whose keys have the same word layout (one or two words per key) hash together.
    layout_code = wide.astype(np.int64) @ (1 << np.arange(keys.shape[1], dtype=np.int64))
    for code in np.unique(layout_code):
        mine = np.flatnonzero(layout_code == code)
        layout = wide[mine[0]]
        columns = [np.full(len(mine), w, dtype=np.uint32) for w in prefix]
        for k, two in enumerate(layout):
            columns.append(low[mine, k])
            if two:
                columns.append(high[mine, k])
        pool[mine] = _mix_entropy(columns, len(mine))
    words = _generate_state(pool).astype(np.uint64)  # 8 words → 4 uint64, little-endian pairs
    u64 = words[:, 0::2] | (words[:, 1::2] << np.uint64(32))
    states, incs = [], []
    for s_hi, s_lo, i_hi, i_lo in u64.tolist():
        inc = ((((i_hi << 64) | i_lo) << 1) | 1) & _M128
        state = (inc + ((s_hi << 64) | s_lo)) & _M128  # srandom: state = 0; step; state += initstate; step
        states.append((state * _PCG_MULT + inc) & _M128)
        incs.append(inc)
    return states, incs


def _hashmix(value: np.ndarray, hash_const: list[int]) -> np.ndarray:
    value = value ^ np.uint32(hash_const[0])
    hash_const[0] = (hash_const[0] * _MULT_A) & 0xFFFFFFFF
    value = value * np.uint32(hash_const[0])
    return value ^ (value >> np.uint32(16))


def _mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    result = _MIX_L * x - _MIX_R * y
    return result ^ (result >> np.uint32(16))


def _mix_entropy(entropy: list[np.ndarray], rows: int) -> np.ndarray:
    hash_const = [_INIT_A]
    zero = np.zeros(rows, dtype=np.uint32)
    mixer = [_hashmix(entropy[i] if i < len(entropy) else zero, hash_const) for i in range(_POOL)]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                mixer[dst] = _mix(mixer[dst], _hashmix(mixer[src], hash_const))
    for src in range(_POOL, len(entropy)):
        for dst in range(_POOL):
            mixer[dst] = _mix(mixer[dst], _hashmix(entropy[src], hash_const))
    return np.stack(mixer, axis=1)


def _generate_state(pool: np.ndarray) -> np.ndarray:
    out = np.empty((len(pool), 2 * _POOL), dtype=np.uint32)
    hash_const = _INIT_B
    for i in range(2 * _POOL):
        value = pool[:, i % _POOL] ^ np.uint32(hash_const)
        hash_const = (hash_const * _MULT_B) & 0xFFFFFFFF
        value = value * np.uint32(hash_const)
        out[:, i] = value ^ (value >> np.uint32(16))
    return out
