"""The typed configs of idempo: the experiment config (experiment.py) and its engine and endpoint sections,
on the shared machinery of base.py."""

from idempo.config.base import (
    ConfigError,
    Section,
    apply_overrides,
    describe_error,
    explain,
    parse_yaml,
    read_yaml_mapping,
    yaml_problem,
)
from idempo.config.endpoints import ENDPOINT_PACE, EndpointConfig, JudgeConfig, TeacherConfig
from idempo.config.engines import (
    Decoding,
    DeepSpeedConfig,
    LoadingConfig,
    LoraConfigSection,
    SamplingConfig,
    SamplingParams,
    TrainingConfig,
    VLLMConfig,
)
from idempo.config.experiment import (
    RANDOM_MODEL,
    TINY_MODEL,
    AmplificationConfig,
    BranchingFactorConfig,
    CycleDataConfig,
    EvaluationConfig,
    ExperimentConfig,
    PreferenceConfig,
    PromptsConfig,
    SeedingConfig,
    config_from_dict,
    defaults_applied,
    endpoint_sections,
    load_config,
)
