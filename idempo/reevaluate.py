"""`idempo eval`: score a saved generation again, with whatever judges the config now names.

Inside a trial dir (`.../cycles/003/adapter`) the answers are sampled with that cycle's own eval seed,
so they are the answers the trial scored, and judges already asked about them answer from the cache:
changing the judge costs only the new judge's calls, re-running costs nothing.
"""

from __future__ import annotations

from pathlib import Path

from idempo.artifacts import write_json, write_jsonl
from idempo.config import ConfigError, ExperimentConfig
from idempo.engines import load_engines
from idempo.evaluation.evaluate import evaluate_generation
from idempo.inputs import evaluation_inputs
from idempo.layout import INIT_CYCLE, TrialLayout
from idempo.models import INITIAL, Generation
from idempo.personas import get_persona
from idempo.progress import Reporter
from idempo.records import Records
from idempo.registry import trains_on_documents
from idempo.seeds import derive_seed, phase_seed, stage_seed


def reevaluate(config: ExperimentConfig, weights: Path | None, out: Path, reporter: Reporter) -> dict:
    """Evaluate M_init (`weights` None) or saved weights; write eval.jsonl and metrics.json to `out`."""
    persona = get_persona(config.persona)
    eval_set, judges = evaluation_inputs(config, persona)
    generation, cycle = _generation(config, weights)
    if cycle is not None and weights is not None:  # a trial's generation: checked against its record first
        Records(TrialLayout(weights.parent.parent.parent).redo_hint, reporter.note).check_tree(weights)
    engines = load_engines(config)
    # a trial's own generation: the eval seed the trial used; other weights: a stream of their own
    seed = (
        phase_seed(config, cycle, "eval")
        if cycle is not None
        else derive_seed(stage_seed(config, 1), "eval", "standalone")
    )
    total = len(eval_set) * config.evaluation.samples_per_prompt
    with reporter.phase(f"evaluate {generation.name}", total, "answers") as bar:
        rows, metrics = evaluate_generation(
            engines,
            generation,
            eval_set,
            persona,
            judges,
            config.evaluation,
            seed,
            bar,
            completion=trains_on_documents(config.regime),
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
