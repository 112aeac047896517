"""What a trial reads besides the model, read and checked before anything heavy: the persona, the prompt
banks, D_seed's given rows and the judges (with their keys)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from idempo.config import ConfigError, ExperimentConfig
from idempo.endpoint import api_key
from idempo.evaluation.evaluate import Judges
from idempo.evaluation.judging import JudgeSpec, judge_loading, make_judge
from idempo.input_files import InputFileError
from idempo.personas import Persona, get_persona
from idempo.prompts import eval_prompts, train_prompts
from idempo.registry import trains_on_documents
from idempo.seed_data import given_seed_rows


@dataclass
class TrialInputs:
    """What a trial reads besides the model, read and checked: the persona, the prompt banks, D_seed's
    given rows (None when a model writes D_seed) and the judges."""

    persona: Persona
    train_bank: list[str]
    given_seed_rows: list[dict] | None
    eval_set: list[str]
    judges: Judges
    reward_judge: Any


def trial_inputs(config: ExperimentConfig) -> TrialInputs:
    """Read and check everything a trial reads besides the model; all problems in one ConfigError."""
    problems: list[str] = []

    def attempt(check, *args):
        try:
            return check(*args)
        except ConfigError as err:
            problems.extend(err.problems)
            return None

    persona = attempt(_persona, config)
    if persona is None:
        raise ConfigError(problems)
    train_bank = attempt(_train_bank, config, persona)
    seed_rows = attempt(given_seed_rows, config, persona)
    if seed_rows is None and train_bank is not None and config.seeding.source in ("model", "teacher"):
        if config.n_seed > len(train_bank):
            problems.append(f"n_seed: got {config.n_seed} but prompts.train has only {len(train_bank)} prompts")
    if config.seeding.source == "teacher":
        attempt(api_key, config.seeding.teacher, "seeding.teacher")
    evaluation = attempt(evaluation_inputs, config, persona)
    reward = attempt(reward_judge, config, persona)
    if problems:
        raise ConfigError(problems)
    eval_set, judges = evaluation
    return TrialInputs(persona, train_bank, seed_rows, eval_set, judges, reward)


def evaluation_inputs(config: ExperimentConfig, persona: Persona) -> tuple[list[str], Judges]:
    """The held-out prompts and the judges; fails on bad input before any model is loaded."""
    try:
        eval_set = eval_prompts(config.prompts.eval, persona, config.evaluation.n_prompts)
    except InputFileError as err:
        raise ConfigError([f"prompts.eval: {problem}" for problem in err.problems]) from None
    try:
        judges = Judges.from_config(config.evaluation, persona, config.loading)
    except ConfigError:
        raise  # names its own field
    except ValueError as err:
        raise ConfigError([f"evaluation.judge: {err}"]) from None
    return eval_set, judges


def reward_judge(config: ExperimentConfig, persona: Persona):
    """self_reward's external judge, if the config names one (otherwise M_{j-1} judges itself)."""
    if config.regime != "self_reward" or config.preference.reward_judge is None:
        return None
    from idempo.regimes.self_reward import EXTERNAL_JUDGE_RUBRIC

    return make_judge(
        JudgeSpec(
            config.preference.reward_judge,
            EXTERNAL_JUDGE_RUBRIC,
            persona,
            "preference.reward_judge",
            judge_loading(config.loading),
            config.evaluation.cache_dir,
        )
    )


def _persona(config: ExperimentConfig) -> Persona:
    try:
        persona = get_persona(config.persona)
    except InputFileError as err:
        raise ConfigError([f"persona: {problem}" for problem in err.problems]) from None
    if trains_on_documents(config.regime) and persona.kind != "belief":
        raise ConfigError(
            [
                f"regime: {config.regime!r} trains documents that state a belief; persona {persona.name!r} is a "
                "chat persona; allowed: a persona of kind 'belief' (e.g. 'nvidia_bear')"
            ]
        )
    return persona


def _train_bank(config: ExperimentConfig, persona: Persona) -> list[str]:
    try:
        return train_prompts(config.prompts.train, persona if trains_on_documents(config.regime) else None)
    except InputFileError as err:
        raise ConfigError([f"prompts.train: {problem}" for problem in err.problems]) from None
