"""`idempo eval`: score a saved generation again, with whatever judges the config now names.

Inside a trial dir (`.../cycles/003/adapter`) the answers are sampled with that cycle's own eval seed,
so they are the answers the trial scored, and judges already asked about them answer from the cache:
changing the judge costs only the new judge's calls, re-running costs nothing.
"""

from __future__ import annotations

from pathlib import Path

from idempo.artifacts import INIT_CYCLE, SEED_CYCLE, TrialLayout, write_json, write_jsonl
from idempo.config import ConfigError, ExperimentConfig
from idempo.evaluation.evaluate import evaluate_generation
from idempo.loop import evaluation_inputs, load_engines
from idempo.models import INITIAL, Generation
from idempo.personas import get_persona
from idempo.progress import Reporter
from idempo.records import Records
from idempo.seeds import derive_seed


def reevaluate(config: ExperimentConfig, weights: Path | None, out: Path, reporter: Reporter) -> dict:
    """Evaluate M_init (`weights` None) or saved weights; write eval.jsonl and metrics.json to `out`."""
    persona = get_persona(config.persona)
    eval_set, judges = evaluation_inputs(config, persona)
    generation, cycle = _generation(config, weights)
    if cycle is not None and weights is not None:  # a trial's generation: checked against its record first
        Records(TrialLayout(weights.parent.parent.parent).redo_hint, reporter.note).check_tree(weights)
    _, _, sampler = load_engines(config)
    stage_seed = config.seeding.seed if cycle in (INIT_CYCLE, SEED_CYCLE) else config.seed
    seed = derive_seed(stage_seed, "eval", cycle if cycle is not None else "standalone")
    total = len(eval_set) * config.evaluation.samples_per_prompt
    with reporter.phase(f"evaluate {generation.name}", total, "answers") as bar:
        rows, metrics = evaluate_generation(
            sampler,
            generation,
            eval_set,
            persona,
            judges,
            config.evaluation,
            seed,
            bar,
            completion=config.regime == "sdf",
        )
    metrics = {"cycle": cycle, "generation": generation.name, "weights": str(weights) if weights else None, **metrics}
    write_jsonl(out / "eval.jsonl", rows)
    write_json(out / "metrics.json", metrics)
    return metrics


def _generation(config: ExperimentConfig, weights: Path | None) -> tuple[Generation, int | None]:
    if weights is None:
        return INITIAL, INIT_CYCLE
    marker = "adapter_config.json" if config.training.finetune == "lora" else "config.json"
    if not (weights / marker).is_file():
        raise ConfigError([f"--adapter: {weights} has no {marker}; training.finetune is {config.training.finetune!r}"])
    cycle = TrialLayout.cycle_of(weights.parent)
    return Generation(weights.parent.name if cycle is not None else weights.name, weights), cycle
