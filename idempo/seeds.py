"""Seeds of named random draws, so that a run resumed anywhere draws exactly what an uninterrupted one does.

Every random draw of a trial is one phase of one stage, and its seed is `phase_seed(config, cycle, phase)`:
the stage's own seed (`seeding.seed` for M_init's evaluation and the seed stage, `seed` for the cycles)
with the phase's name and the cycle. Two names keep the form they had when they were first written, so
that trials written then draw the same: D_seed's answers ("seed-data", no cycle) and the seed stage's
M_init answers ("initial" with the stage "seed").
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from idempo.config import ExperimentConfig

_SEED_CYCLE = 0
_NAMED = {("seed-data", _SEED_CYCLE): (), ("initial", _SEED_CYCLE): ("seed",)}


def derive_seed(*parts) -> int:
    """A 31-bit seed from named parts, stable across processes and Python versions."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def stage_seed(config: ExperimentConfig, cycle: int) -> int:
    """M_init's evaluation and the seed stage draw from `seeding.seed` (shared by replicas), cycles from `seed`."""
    return config.seeding.seed if cycle <= _SEED_CYCLE else config.seed


def phase_seed(config: ExperimentConfig, cycle: int, phase: str) -> int:
    """The seed of `phase` ("sample", "train", "eval", ...) in stage `cycle` (-1 M_init, 0 the seed, 1..C)."""
    return derive_seed(stage_seed(config, cycle), phase, *_NAMED.get((phase, cycle), (cycle,)))
