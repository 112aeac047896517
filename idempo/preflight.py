"""Every check a trial's inputs can fail, before anything heavy: before a model loads, before Ray starts.

The schema (idempo.config) checks each field on its own; what needs files, the persona, the banks, the
judges' keys or the machine is checked here, once per trial, and every problem of every trial is reported
together, each with the trial and field it belongs to. `idempo run`, `eval`, `calibrate`, `config` and
`sweep` (with or without --dry-run) all call it, so a bad input never reaches the cluster, where a trial
would fail after its model loaded (and Tune would retry it).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING

from idempo.config import ConfigError, ExperimentConfig
from idempo.engines import check_engines
from idempo.inputs import TrialInputs, trial_inputs
from idempo.layout import TrialConflict, TrialLayout
from idempo.personas import get_persona

if TYPE_CHECKING:
    from idempo.sweep import StopSettings, Sweep


def check_trial(config: ExperimentConfig, out: Path | None = None, machine: bool = True) -> TrialInputs:
    """All of a trial's checks: its inputs, its LoRA targets, the trial dir it resumes (`out`) and, with
    `machine`, what this machine must offer (CUDA, packages); all problems in one ConfigError."""
    problems: list[str] = []
    inputs = None
    try:
        inputs = trial_inputs(config)
    except ConfigError as err:
        problems += err.problems
    problems += lora_target_problems(config)
    if out is not None:
        problems += trial_dir_problems(config, out)
    if machine:
        problems += machine_problems(config)
    if problems:
        raise ConfigError(problems)
    return inputs


def trial_dir_problems(config: ExperimentConfig, out: Path) -> list[str]:
    """A dir that holds another trial's config cannot be resumed with this one."""
    try:
        TrialLayout(out).check(config.to_dict())
    except TrialConflict as err:
        return [str(err) if str(err).startswith("--out") else f"--out: {err}"]
    return []


def machine_problems(config: ExperimentConfig) -> list[str]:
    """What this machine lacks for the trial's engines: CUDA for a cuda device, vllm, DeepSpeed."""
    problems = []
    if config.loading.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            problems.append(
                f"loading.device: got {config.loading.device!r} but no CUDA GPU is visible; allowed here: "
                "'cpu' or 'auto'"
            )
        elif ":" in config.loading.device and int(config.loading.device.split(":")[1]) >= torch.cuda.device_count():
            problems.append(
                f"loading.device: got {config.loading.device!r} but this machine has "
                f"{torch.cuda.device_count()} CUDA GPU(s)"
            )
    try:
        check_engines(config)
    except ConfigError as err:
        problems += [p for p in err.problems if p not in problems]
    return problems


def lora_target_problems(config: ExperimentConfig) -> list[str]:
    """LoRA target modules that name no module of the model: PEFT would fail after the model loaded. Read
    from the model's architecture built on the meta device (no weights); skipped where the model's config is
    not on this machine (a hub id not yet downloaded, a named model not yet converted)."""
    targets = config.training.lora.target_modules
    if config.training.finetune != "lora" or targets == "all-linear":
        return []
    modules = _modules(config)
    if modules is None:
        return []
    names = list(modules)
    if isinstance(targets, str):
        if any(re.fullmatch(targets, name) for name in names):
            return []
        missing = [targets]
    else:
        missing = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in names)]
    if not missing:
        return []
    import torch

    linear = sorted(
        {name.rsplit(".", 1)[-1] for name, module in modules.items() if isinstance(module, torch.nn.Linear)}
    )
    return [
        f"training.lora.target_modules: {missing} match no module of {config.model}; its linear modules are "
        f"{', '.join(linear)} (or 'all-linear')"
    ]


def _modules(config: ExperimentConfig) -> dict | None:
    return _architecture_modules(config.model, config.loading.revision, config.loading.trust_remote_code)


@functools.cache
def _architecture_modules(model_name: str, revision: str | None, trust_remote_code: bool) -> dict | None:
    """The modules of a model's architecture by name, built on the meta device; cached: a sweep's trials
    mostly share one model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from idempo.config import RANDOM_MODEL, TINY_MODEL
    from idempo.named_models import NAMED_MODELS

    if model_name in NAMED_MODELS or model_name.endswith(".gguf") or model_name.startswith(RANDOM_MODEL):
        return None  # known once fetched, converted or built; PEFT checks the targets then
    try:
        source = model_name
        if model_name == TINY_MODEL:
            from idempo.tiny import tiny_model_dir

            source = tiny_model_dir()  # built in seconds, and the trial builds it anyway
        model_config = AutoConfig.from_pretrained(
            source, local_files_only=True, revision=revision, trust_remote_code=trust_remote_code
        )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    return {name: module for name, module in model.named_modules() if name}


# Numeric metrics every cycle reports, by group: what a sweep's `run.stop.metric` can name.
_STATISTIC = ("mean", "se", "n", "ci95_low", "ci95_high")
_ALWAYS = (
    "refusal_rate",
    "mean_tokens",
    "finished_rate",
    "degeneration.mean_words",
    "degeneration.distinct_1",
    "degeneration.distinct_2",
    "degeneration.repeated_4gram_rate",
    "degeneration.non_alpha_share",
)


def stop_metrics(config: ExperimentConfig) -> set[str]:
    """The dotted metric paths a trial of `config` reports every cycle (trait and coherence statistics, the
    branching factor where it is on, marker rates where the persona has markers, degeneration)."""
    groups = ["trait"]
    if config.evaluation.coherence_judge is not None:
        groups.append("coherence")
    if config.evaluation.branching_factor.enabled:
        groups.append("branching_factor")
    if get_persona(config.persona).markers:
        groups.append("marker_rate")
    metrics = {f"{group}.{stat}" for group in groups for stat in _STATISTIC} | set(_ALWAYS)
    if config.evaluation.coherence_judge is not None:
        metrics.add("coherence_refusal_rate")
    return metrics


def stop_problems(settings: StopSettings | None, config: ExperimentConfig) -> list[str]:
    if settings is None:
        return []
    allowed = stop_metrics(config)
    if settings.metric in allowed:
        return []
    if settings.metric.startswith("coherence") and config.evaluation.coherence_judge is None:
        return [
            f"run.stop.metric: got {settings.metric!r}, which needs a coherence judge; set "
            "evaluation.coherence_judge (openai or hf), or stop on another metric"
        ]
    return [f"run.stop.metric: got {settings.metric!r}; allowed: {', '.join(sorted(allowed))}"]


def gpu_problems(config: ExperimentConfig, gpus: float) -> list[str]:
    """Engines that need a GPU in a sweep whose trials ask for none, or more of a GPU than the share they ask
    for (checked by resources, not by the driver's machine: the driver often has no GPU while the workers
    do)."""
    if 0 < gpus < 1:
        return share_problems(config, gpus)
    if gpus > 0:
        return []
    needs = []
    if config.loading.device.startswith("cuda"):
        needs.append(f"loading.device {config.loading.device!r}")
    if config.sampling.backend == "vllm":
        needs.append("sampling.backend 'vllm'")
    if config.training.deepspeed is not None:
        needs.append("training.deepspeed")
    if not needs:
        return []
    return [f"run.resources.gpus: got 0 but {' and '.join(needs)} need(s) a GPU; ask for gpus >= 1"]


def share_problems(config: ExperimentConfig, gpus: float) -> list[str]:
    """What cannot run on a share of one GPU: training ranks of their own (each holds a whole GPU, and the
    ranks of one group must not share one), an engine spread over several GPUs, or an engine that takes
    the whole share."""
    problems, share = [], f"run.resources.gpus {gpus:g} (a share of one GPU)"
    workers = config.training.deepspeed.workers if config.training.deepspeed is not None else 1
    if workers > 1:
        problems.append(
            f"training.deepspeed.workers: got {workers} with {share}; ranks beyond the first take whole GPUs, so "
            "allowed: workers 1 (ZeRO in the engines' process) or run.resources.gpus >= 1"
        )
    if config.sampling.backend == "vllm":
        engine = config.sampling.vllm
        if engine.tensor_parallel_size > 1:
            problems.append(
                f"sampling.vllm.tensor_parallel_size: got {engine.tensor_parallel_size} with {share}; allowed: 1"
            )
        if engine.gpu_memory_utilization >= gpus:
            problems.append(
                f"sampling.vllm.gpu_memory_utilization: got {engine.gpu_memory_utilization:g} with {share}; the "
                f"engine's share of the GPU's memory must be under the trial's, leaving the policy and training "
                f"room: allowed below {gpus:g}"
            )
    return problems


def check_sweep(sweep: Sweep, resume: bool = False) -> None:
    """Every trial's checks and the sweep's own (stop metric, GPUs, endpoint keys, a resumed sweep's
    changes), before Ray starts; all problems in one ConfigError, each prefixed with its trial."""
    from idempo.sweep import changes_since_recorded

    trials_with: dict[str, list[str]] = {}  # problem -> the trials that have it
    for trial in sweep.trials:
        found = []
        try:
            check_trial(trial.config, sweep.trial_dir(trial.name), machine=False)
        except ConfigError as err:
            found += err.problems
        found += stop_problems(sweep.run.stop, trial.config)
        found += gpu_problems(trial.config, sweep.run.resources.gpus)
        for problem in found:
            trials_with.setdefault(problem, []).append(trial.name)
    problems = [f"{_trials(names, len(sweep.trials))}: {problem}" for problem, names in trials_with.items()]
    if resume:
        changes = changes_since_recorded(sweep)
        if changes:
            problems.append(
                f"--resume: {sweep.file} changed since the sweep's first run ({sweep.layout.record}): "
                + "; ".join(changes)
                + ". Restore the file to resume, or run without --resume to start the sweep again over the "
                "same trial dirs (finished cycles are reused; a larger `cycles` extends them)"
            )
    if problems:
        raise ConfigError(problems, source=str(sweep.file))


def _trials(names: list[str], total: int) -> str:
    """'trial a', 'trials a, b', or 'every trial (24)' for a problem that many trials share."""
    if len(names) == 1:
        return f"trial {names[0]}"
    if len(names) == total:
        return f"every trial ({total})"
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"trials {shown}"
