"""A trial's engines: M_init's tokenizer, the policy that holds each generation's weights, the sampler
that reads them and the trainer that writes them, each picked by name from config (idempo.registry)."""

from __future__ import annotations

from dataclasses import dataclass

from idempo.config import ConfigError, ExperimentConfig
from idempo.models import Policy, load_base_model, load_tokenizer, make_policy
from idempo.placement import UNPLACED, TrialPlacement
from idempo.progress import Reporter
from idempo.registry import SAMPLERS, TRAINERS, trains_on_documents
from idempo.sampling import Sampler
from idempo.threads import use_threads
from idempo.training.local import Trainer


def trainer_name(config: ExperimentConfig) -> str:
    return "local" if config.training.deepspeed is None else "zero"


def check_engines(config: ExperimentConfig) -> None:
    """The configured engines can run on this machine (packages, GPUs); fails before any model loads."""
    problems = []
    for check in (SAMPLERS.load(config.sampling.backend).check, TRAINERS.load(trainer_name(config)).check):
        try:
            check(config)
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)


@dataclass
class Engines:
    tokenizer: object
    policy: Policy
    sampler: Sampler
    trainer: Trainer

    @property
    def statistics_batch(self) -> int:
        """Answers per forward pass of the branching factor's statistics (full-vocabulary logits are large)."""
        return min(getattr(self.sampler, "batch_size", 8), 8)


def load_engines(
    config: ExperimentConfig, reporter: Reporter | None = None, placement: TrialPlacement = UNPLACED
) -> Engines:
    """M_init once, the policy that holds each generation's weights, the sampler that uses it, the trainer."""
    check_engines(config)
    use_threads(config.loading.threads)
    tokenizer = load_tokenizer(config.model, config.loading, chat=not trains_on_documents(config.regime))
    policy = make_policy(load_base_model(config.model, config.loading), tokenizer, config.training)
    sampler = SAMPLERS.load(config.sampling.backend).from_config(config, tokenizer, policy)
    trainer = TRAINERS.load(trainer_name(config))(config, tokenizer, policy, reporter or Reporter(False), placement)
    return Engines(tokenizer, policy, sampler, trainer)
