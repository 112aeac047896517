"""One trial of iterated self-training, in process and without Ray.

    evaluate M_init                                        (cycle -1)
    D_seed <- persona data; M_seed <- train(M_init, D_seed); evaluate   (cycle 0)
    for j in 1..cycles:
        D_j <- n_sampled answers of M_{j-1}, no system prompt
        M_j <- train(M_init or M_{j-1}, D_j); evaluate

`Trial.stages()` runs these in order, one stage at a time, and yields each stage's metrics. What a regime
trains on and how is its own (idempo.regimes); where a generation starts and what its reference is, is
`lineage`; every draw's seed is `idempo.seeds.phase_seed`. The engines load at the first stage that needs
them, so a finished trial resumes without loading a model. Artifacts go through `TrialLayout`.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from idempo.artifacts import atomic_dir, write_json
from idempo.config import ConfigError, ExperimentConfig, SamplingParams
from idempo.data import CycleMetrics, Record, Sample, drop_empty, kept, require_data, row_from_json
from idempo.engines import Engines, check_engines, load_engines
from idempo.evaluation.evaluate import evaluate_generation
from idempo.evaluation.judging import check_refusal_rate
from idempo.gpu_monitor import GpuMonitor
from idempo.inputs import TrialInputs, trial_inputs
from idempo.layout import INIT_CYCLE, SEED_CYCLE, TrialLayout, stage_cycles
from idempo.models import INITIAL, Generation
from idempo.placement import UNPLACED, TrialPlacement
from idempo.progress import Reporter
from idempo.prompts import cycle_prompts, seed_prompts
from idempo.records import DamagedArtifact, Records
from idempo.regimes import StageContext, load_regime
from idempo.registry import seed_regime, trains_on_documents
from idempo.seed_data import persona_chats, persona_documents
from idempo.seeds import phase_seed
from idempo.shared import SharedStages
from idempo.teacher import teacher_seed_rows
from idempo.timeline import PhaseTimeline

# What `idempo status` calls the phases the stages time (timing_s in metrics.json): sampling, training,
# evaluating, and judging the samples (cycle_data.min_coherence, self_reward's external judge).
PHASES = {
    "seed data": "sampling",
    "sample": "sampling",
    "sleep": "training",
    "train": "training",
    "eval": "evaluating",
    "judge": "judging",
}


def run_trial(
    config: ExperimentConfig,
    out: str | Path,
    until_cycle: int | None = None,
    reporter: Reporter | None = None,
    shared: SharedStages | None = None,
    inputs: TrialInputs | None = None,
) -> list[dict]:
    """Run (or resume) a trial in `out`; returns the metrics of every completed cycle, -1 first. With
    `shared`, M_init's evaluation and the seed stage come from (or go to) a sweep's shared store; `inputs`:
    what `idempo.preflight` already read and checked for this config (read here otherwise)."""
    trial = Trial(config, Path(out), reporter or Reporter(enabled=False), shared, inputs)
    return [metrics.to_json() for metrics in trial.stages(until_cycle)]


def lineage(config: ExperimentConfig, cycle: int, previous: Generation) -> tuple[Generation | None, Generation]:
    """Where M_cycle starts (None: fresh from M_init) and the reference its preference loss reads, given
    M_{cycle-1} (`previous`, M_init for M_seed)."""
    start = None if cycle == SEED_CYCLE or config.init == "initial" else previous
    reference = {"initial": INITIAL, "start": start or INITIAL, "previous": previous}[config.preference.reference]
    return start, reference


class Trial:
    """The state of one trial: its inputs, its dir, its regime, and its engines once a stage needs them."""

    def __init__(
        self,
        config: ExperimentConfig,
        out: Path,
        reporter: Reporter,
        shared: SharedStages | None = None,
        inputs: TrialInputs | None = None,
        placement: TrialPlacement = UNPLACED,
    ):
        self.config = config
        self.reporter = reporter
        self.layout = TrialLayout(out)
        self.shared = shared
        self.placement = placement
        # Everything that can be wrong with the inputs fails here, before the model is loaded.
        self.inputs = inputs or trial_inputs(config)
        self.regime = load_regime(config.regime)
        self.seed_regime = load_regime(seed_regime(config.regime))
        self.documents = trains_on_documents(config.regime)
        # The lock, then the config comparison, then the engines: a second process on a running trial, or a
        # run with another config, is refused before it loads anything.
        self.layout.claim(config.to_dict())
        self.records = Records(self.layout.redo_hint, reporter.note)
        try:
            check_engines(config)
        except ConfigError:
            self.layout.release_fresh()
            raise
        self._engines: Engines | None = None
        self._now: tuple[int | None, str | None] = (None, None)  # the stage and phase progress.json names
        self.timeline = PhaseTimeline(self.layout.timeline)
        self.teacher_usage: dict | None = None

    @property
    def engines(self) -> Engines:
        """M_init, the policy, the sampler and the trainer, loaded when a stage first needs them."""
        if self._engines is None:
            try:
                self._engines = load_engines(self.config, self.reporter, self.placement)
            except BaseException:
                if not (self.layout.root / "cycles").exists():
                    self.layout.release_fresh()  # a new trial dir that never began is not left behind
                raise
        return self._engines

    # -- the stages -------------------------------------------------------------------------------

    def stages(self, until_cycle: int | None = None) -> Iterator[CycleMetrics]:
        """Run each stage in order (M_init's evaluation, the seed, cycles 1.. up to `until_cycle`), or find it
        done, and yield its metrics."""
        last = self.config.cycles if until_cycle is None else min(self.config.cycles, until_cycle)
        for cycle in stage_cycles(last):
            yield self.stage(cycle)

    def stage(self, cycle: int) -> CycleMetrics:
        done = self.layout.is_complete(cycle)
        self._now = (cycle, None)
        if not done:
            produce = {INIT_CYCLE: self._evaluate_initial, SEED_CYCLE: self._seed_stage}.get(cycle, self._cycle)
            if self.shared is None or not self.shared.covers(cycle):
                produce(cycle, None)
            else:  # a stage several trials share: from the sweep's store when it has it, else run here
                self.shared.run(
                    cycle, self.config, self.layout, lambda n: produce(cycle, n), self.reporter.note, self.records
                )
        metrics = self.records.read_json(self.layout.metrics(cycle))
        if done:
            self.reporter.cycle(metrics, resumed=True)
        elif (metrics.get("shared") or {}).get("reused"):
            self.reporter.cycle(metrics, shared=True)
        return CycleMetrics.from_json(metrics)

    def _evaluate_initial(self, cycle: int, shared: dict | None) -> None:
        with self._stage_timing() as timing:
            metrics = self._evaluate(cycle, INITIAL, timing)
        self._finish(metrics, timing, shared=shared)

    def _seed_stage(self, cycle: int, shared: dict | None) -> None:
        """D_seed from the persona, M_seed trained on it from a fresh start."""
        with self._stage_timing() as timing:
            path = self.layout.data(cycle)
            if not path.exists():
                with self._timed("seed data", timing, gpu=self.config.seeding.source == "model"):  # M_init writes
                    self.records.write_jsonl(path, [row.to_json() for row in drop_empty(self._seed_data())])
            rows = [Sample(**row) for row in self.records.read_jsonl(path, nonempty=True)]
            rows = self.seed_regime.seed_rows(self._context(cycle, timing), rows)
            generation, stats = self._train(cycle, rows, timing)
            metrics = self._evaluate(cycle, generation, timing)
        self._finish(metrics, timing, self.seed_regime.data_metrics(rows, cycle), stats, shared)

    def _cycle(self, cycle: int, shared: dict | None = None) -> None:
        """Sample from M_{j-1}, train M_j from the init strategy's start, evaluate M_j."""
        with self._stage_timing() as timing:
            path = self.layout.data(cycle)
            if not path.exists():
                self.records.write_jsonl(path, [row.to_json() for row in self._cycle_data(cycle, timing)])
            rows = [row_from_json(row) for row in self.records.read_jsonl(path, nonempty=True)]
            generation, stats = self._train(cycle, rows, timing)
            metrics = self._evaluate(cycle, generation, timing)
        self._finish(metrics, timing, self.regime.data_metrics(rows, cycle), stats)

    # -- what each generation trains on -----------------------------------------------------------

    def _seed_data(self) -> list[Sample]:
        config, inputs = self.config, self.inputs
        if inputs.given_seed_rows is not None:
            return [Sample(**row) for row in inputs.given_seed_rows]
        seeding = config.seeding
        if seeding.source == "teacher":
            order = seed_prompts(inputs.train_bank, len(inputs.train_bank), seeding.seed)
            with self.reporter.phase("seed: the teacher writes D_seed", config.n_seed, "questions") as bar:
                rows, self.teacher_usage = teacher_seed_rows(
                    inputs.persona,
                    order,
                    config.n_seed,
                    seeding.teacher,
                    seeding.seed,
                    config.evaluation.cache_dir,
                    bar,
                    documents=self.documents,
                )
            return [Sample(**row) for row in rows]
        prompts = seed_prompts(inputs.train_bank, config.n_seed, seeding.seed)
        params = config.seed_decoding.params(phase_seed(config, SEED_CYCLE, "seed-data"))
        if self.documents:
            elicited = persona_documents(inputs.persona, prompts)
        else:
            elicited = persona_chats(inputs.persona, prompts, seeding.instruction)
        with self.reporter.phase("seed: M_init writes D_seed", len(prompts), "answers") as bar:
            completions = self.engines.sampler.generate(elicited, params, INITIAL, bar)
        return [Sample(p, c.text) for p, c in zip(prompts, completions, strict=True)]

    def _cycle_data(self, cycle: int, timing: dict) -> list[Record]:
        """What M_j trains on: the regime's rows from M_{j-1}, with (cycle_data.min_coherence) incoherent
        ones marked as dropped, and D_seed mixed in by cycle_data.seed_mix."""
        context = self._context(cycle, timing)
        prompts = cycle_prompts(self._cycle_pool(), self.config.n_sampled, cycle, self.config.seed)
        rows = self.regime.cycle_rows(context, prompts, self._generation(cycle - 1))
        if self.config.cycle_data.min_coherence is not None:
            rows = self._coherent(rows, timing)
        if self.config.cycle_data.seed_mix > 0:
            rows += self._from_d_seed(context)
        return rows

    def _coherent(self, rows: list[Record], timing: dict) -> list[Record]:
        """Rows whose answer the coherence judge scores under cycle_data.min_coherence are dropped."""
        threshold = self.config.cycle_data.min_coherence
        judged = [i for i, row in enumerate(rows) if row.trained]
        with self._timed("judge", timing):
            judgments = self.inputs.judges.coherence.score([(rows[i].prompt, rows[i].response) for i in judged])
        check_refusal_rate(judgments, self.config.evaluation.coherence_judge, "evaluation.coherence_judge")
        rows = list(rows)
        for index, judgment in zip(judged, judgments, strict=True):
            row = replace(rows[index], coherence=judgment.score)
            if judgment.score is None:
                row = row.drop("coherence judge refused")
            elif judgment.score < threshold:
                row = row.drop(f"coherence below {threshold:g}")
            rows[index] = row
        return rows

    def _from_d_seed(self, context: StageContext) -> list[Sample]:
        """A seeded draw of cycle_data.seed_mix x |D_seed| rows of D_seed, as the seed stage's regime trains on
        them (in preference regimes with M_init's answers as their rejected side)."""
        seed_rows = kept([Sample(**row) for row in self.records.read_jsonl(self.layout.data(SEED_CYCLE))])
        count = round(self.config.cycle_data.seed_mix * len(seed_rows))
        chosen = random.Random(context.seed("seed-mix", context.cycle)).sample(seed_rows, count)
        rows = [Sample(row.prompt, row.response, source="d_seed") for row in chosen]
        return self.seed_regime.seed_rows(context, rows) if rows else rows

    def _context(self, cycle: int, timing: dict) -> StageContext:
        return StageContext(
            config=self.config,
            cycle=cycle,
            answers=lambda prompts, params, generation, label, unit="answers", phase="sample": self._answers(
                prompts, params, generation, label, timing, unit, phase
            ),
            initial_answers=lambda prompts, seed: self._initial_answers(prompts, seed, timing),
            generation=self._generation,
            seed=lambda phase, at: phase_seed(self.config, at, phase),
            timed=lambda phase: self._timed(phase, timing),
            reward_judge=self.inputs.reward_judge,
        )

    def _answers(
        self,
        prompts: list[str],
        params: SamplingParams,
        generation: Generation,
        label: str,
        timing: dict,
        unit: str = "answers",
        phase: str | None = "sample",
    ) -> list[Sample]:
        """One answer per prompt (chat, no system prompt), or a continuation per document prefix."""
        inputs = prompts if self.documents else [[{"role": "user", "content": p}] for p in prompts]
        timed = self._timed(phase, timing) if phase else _untimed()
        with timed, self.reporter.phase(label, len(prompts), unit) as bar:
            completions = self.engines.sampler.generate(inputs, params, generation, bar)
        return [Sample(p, c.text, c.n_tokens, c.finished) for p, c in zip(prompts, completions, strict=True)]

    def _initial_answers(self, prompts: list[str], seed: int, timing: dict) -> dict[str, str]:
        """M_init's answers, generated once per prompt per trial and kept in `initial-answers.jsonl`."""
        path = self.layout.initial_answers
        known = {row["prompt"]: row["response"] for row in (self.records.read_jsonl(path) if path.exists() else [])}
        missing = list(dict.fromkeys(p for p in prompts if p not in known))
        if missing:
            params = self.config.sampling.params(seed)
            rows = self._answers(missing, params, INITIAL, "M_init answers (rejected side)", timing)
            known.update({row.prompt: row.response for row in rows})
            self.records.write_jsonl(path, [{"prompt": p, "response": r} for p, r in known.items()])
        return {p: known[p] for p in prompts}

    # -- training and evaluation ------------------------------------------------------------------

    def _train(self, cycle: int, rows: list[Record], timing: dict) -> tuple[Generation, dict]:
        weights = self.layout.weights(cycle, self.config.training.finetune)
        generation = Generation(weights.parent.name, weights)
        stats_path = self.layout.train_stats(cycle)
        if weights.exists() and stats_path.exists():  # trained before an interruption: used once checked
            self.records.check_tree(weights)
            return generation, self.records.read_json(stats_path)
        label = f"cycle {cycle}: train {generation.name}" if cycle else "seed: train M_seed"
        regime = self.seed_regime if cycle == SEED_CYCLE else self.regime
        rows = require_data(rows, label)
        with self._timed("sleep", timing):  # a sampler that shares the GPUs gives its memory to training
            self.engines.sampler.sleep()
        start, reference = lineage(self.config, cycle, self._generation(cycle - 1) if cycle > SEED_CYCLE else INITIAL)
        seeds = phase_seed(self.config, cycle, "init"), phase_seed(self.config, cycle, "train")
        with self._timed("train", timing), atomic_dir(weights) as tmp:
            stats = self.engines.trainer.fit(regime, rows, start, reference, seeds, generation, tmp, label)
            self.records.record_tree(weights, tmp)  # before the rename: the weights never lack their record
        stats["start"] = start.name if start else "init"  # what M_j descends from
        self.records.write_json(stats_path, stats)
        return generation, stats

    def _evaluate(self, cycle: int, generation: Generation, timing: dict) -> CycleMetrics:
        total = len(self.inputs.eval_set) * self.config.evaluation.samples_per_prompt
        with self._timed("eval", timing), self.reporter.phase(f"evaluate {generation.name}", total, "answers") as bar:
            rows, metrics = evaluate_generation(
                self.engines,
                generation,
                self.inputs.eval_set,
                self.inputs.persona,
                self.inputs.judges,
                self.config.evaluation,
                phase_seed(self.config, cycle, "eval"),
                bar,
                completion=self.documents,
            )
        self.records.write_jsonl(self.layout.eval(cycle), rows)
        return CycleMetrics(cycle, generation.name, metrics)

    def _finish(self, metrics: CycleMetrics, timing: dict, data=None, train=None, shared=None) -> None:
        """Write metrics.json: the cycle is complete once it exists (eval.jsonl is written before it)."""
        if data is not None and metrics.cycle == SEED_CYCLE and self.teacher_usage is not None:
            data["teacher_usage"] = self.teacher_usage  # this run's requests only
        metrics.data, metrics.train, metrics.shared, metrics.timing_s = data, train, shared, timing
        self.records.write_json(self.layout.metrics(metrics.cycle), metrics.to_json())
        self.reporter.cycle(metrics.to_json())

    # -- helpers ----------------------------------------------------------------------------------

    def _generation(self, cycle: int) -> Generation:
        """M_cycle's saved weights, checked against their record before anything samples from or trains
        on them (once per process: a full model's files are hashed too, only the generations used)."""
        weights = self.layout.weights(cycle, self.config.training.finetune)
        if not weights.is_dir():
            raise DamagedArtifact(
                f"{weights}: missing, though cycle {cycle} is complete; {self.layout.redo_hint(weights)}"
            )
        self.records.check_tree(weights)
        return Generation(weights.parent.name, weights)

    def _cycle_pool(self) -> list[str]:
        """Train-bank prompts not used by D_seed."""
        used = {row["prompt"] for row in self.records.read_jsonl(self.layout.data(SEED_CYCLE))}
        pool = [p for p in self.inputs.train_bank if p not in used]
        if not pool:
            raise ValueError("every train-bank prompt is in D_seed; give prompts.train a larger bank")
        return pool

    def _progress(self, phase: str | None) -> None:
        """progress.json, when the phase changes: what `idempo status` shows while the stage runs (nothing in
        a cycle dir changes: it is a file of the trial's own)."""
        cycle, now = self._now
        if phase is not None and cycle is not None and phase != now:
            self._now = (cycle, phase)
            record = {"cycle": cycle, "phase": phase, "since": round(time.time(), 1)}
            write_json(self.layout.progress, record | {"host": socket.gethostname(), "pid": os.getpid()})

    @contextmanager
    def _stage_timing(self) -> Iterator[dict]:
        """timing_s of a stage: seconds per phase, then its `total` and on GPUs `gpu_busy` / `gpu_idle`."""
        timing: dict[str, float] = {}
        gpu = GpuMonitor().start()
        yield timing
        gpu.stop()
        timing["total"] = round(gpu.wall_s, 3)
        if gpu.busy_s is not None:
            timing.update(gpu_busy=round(gpu.busy_s, 3), gpu_idle=round(gpu.idle_s, 3))

    @contextmanager
    def _timed(self, name: str, timing: dict, gpu: bool | None = None):
        """Adds the block's seconds to `timing` under `name`, and the block to the trial's timeline."""
        self._progress(PHASES.get(name))
        started = time.perf_counter()
        try:
            with self.timeline.phase(self._now[0], name, gpu):
                yield
        finally:
            timing[name] = round(timing.get(name, 0.0) + time.perf_counter() - started, 3)


@contextmanager
def _untimed():
    yield
