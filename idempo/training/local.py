"""The trainer interface, and the local trainer: a generation trained in this process, on the trial's own
policy, so that sampling it next costs no load."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from idempo.models import Generation, Policy
from idempo.progress import Reporter
from idempo.training.optimize import ONE_PROCESS

if TYPE_CHECKING:
    from idempo.config import ExperimentConfig
    from idempo.data import Record
    from idempo.placement import TrialPlacement
    from idempo.regimes import Regime


class Trainer(Protocol):
    """Trains one generation by a regime's loss and writes its weights (`idempo.registry.TRAINERS`)."""

    def __init__(
        self, config: ExperimentConfig, tokenizer, policy: Policy, reporter: Reporter, placement: TrialPlacement
    ) -> None: ...

    @classmethod
    def check(cls, config: ExperimentConfig) -> None:
        """Raise ConfigError if this trainer cannot run the experiment here (before any model loads)."""
        ...

    def fit(
        self,
        regime: Regime,
        rows: list[Record],
        start: Generation | None,
        reference: Generation,
        seeds: tuple[int, int],
        generation: Generation,
        out: Path,
        label: str,
    ) -> dict:
        """Train `generation` on the kept `rows` from `start` (None: fresh adapters drawn from seeds[0]) with
        seeds[1], against `reference`; write its weights to `out` (renamed to generation.path after); return
        the run's statistics."""
        ...


class LocalTrainer:
    def __init__(self, config, tokenizer, policy: Policy, reporter: Reporter, placement=None):
        self.config, self.tokenizer, self.policy, self.reporter = config, tokenizer, policy, reporter

    @classmethod
    def check(cls, config) -> None:
        """Runs wherever the policy does."""

    def fit(self, regime, rows, start, reference, seeds, generation: Generation, out: Path, label: str) -> dict:
        init_seed, train_seed = seeds
        self.policy.start(start, init_seed)
        stats = regime.fit(
            self.policy, self.tokenizer, self.config, rows, train_seed, reference, ONE_PROCESS, self.reporter, label
        )
        self.policy.save(out, generation)  # the policy holds the new generation from now on
        return stats
