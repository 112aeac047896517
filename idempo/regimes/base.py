"""What a regime is: how a stage's training rows are built and how a generation is fitted to them.

A regime is a class registered by name in `idempo.registry.REGIMES` (with what config validation must know
before importing it: its default settings, whether it trains on documents, which regime's loss trains its
M_seed and which settings that seed stage reads). The loop hands it a `StageContext`, never the trial.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from idempo.config import ExperimentConfig
from idempo.data import Record, Sample, data_summary, drop_empty
from idempo.models import Generation, Policy
from idempo.progress import Reporter
from idempo.training.optimize import Ranks

if TYPE_CHECKING:
    from idempo.evaluation.judging import RubricJudge


@dataclass
class StageContext:
    """What a regime may use while it builds one stage's rows."""

    config: ExperimentConfig
    cycle: int
    # answers(prompts, params, generation, label, unit="answers", phase="sample"): one answer of `generation`
    # per prompt (chat, no system prompt; a continuation per document prefix for document regimes), empty
    # answers kept as they are; its seconds count under timing_s[phase] (None: under the caller's phase)
    answers: Callable[..., list[Sample]]
    # initial_answers(prompts, seed): M_init's answer to each prompt, sampled once per trial and kept
    initial_answers: Callable[[list[str], int], dict[str, str]]
    generation: Callable[[int], Generation]  # M_k's saved weights, checked against their record
    seed: Callable[[str, int], int]  # seed(phase, cycle): the seed of a phase (idempo.seeds.phase_seed)
    timed: Callable[[str], AbstractContextManager]  # timed(phase): adds the block's seconds to timing_s
    reward_judge: RubricJudge | None = None  # self_reward's external judge, if configured


class Regime:
    """The default regime behaviour is SFT's: D_seed trains as it is, a cycle trains on M_{j-1}'s answers."""

    name = "sft"

    def seed_rows(self, context: StageContext, rows: list[Sample]) -> list[Sample]:
        """D_seed's examples (or those mixed into a cycle from it) as this regime trains on them."""
        return rows

    def cycle_rows(self, context: StageContext, prompts: list[str], previous: Generation) -> list[Record]:
        """What M_j trains on: M_{j-1}'s answers to the cycle's prompts, empty ones marked as dropped."""
        config = context.config
        params = config.sampling.params(context.seed("sample", context.cycle))
        label = f"cycle {context.cycle}: sample from {previous.name}"
        return drop_empty(context.answers(prompts, params, previous, label))

    def fit(
        self,
        policy: Policy,
        tokenizer,
        config: ExperimentConfig,
        rows: list[Record],
        seed: int,
        reference: Generation,
        ranks: Ranks,
        reporter: Reporter,
        label: str,
    ) -> dict:
        """Train `policy` in place on the rows it keeps (at least one), against `reference` where the loss
        has one; returns the run's statistics (train.json)."""
        raise NotImplementedError

    def data_metrics(self, rows: list[Record], cycle: int) -> dict:
        """metrics.json's `data`."""
        return data_summary(rows)
