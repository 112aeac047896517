"""One trial of iterated self-training, in process and without Ray.

    evaluate M_init                                        (cycle -1)
    D_seed <- persona data; M_seed <- train(M_init, D_seed); evaluate   (cycle 0)
    for j in 1..cycles:
        D_j <- n_sampled answers of M_{j-1}, no system prompt
        M_j <- train(M_init or M_{j-1}, D_j); evaluate

Each phase draws its randomness from (stage seed, phase, cycle), so a trial resumed at any phase
boundary produces exactly what an uninterrupted one would. Artifacts go through `TrialLayout`.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from pathlib import Path

from idempo.artifacts import INIT_CYCLE, SEED_CYCLE, TrialLayout, atomic_dir
from idempo.config import ConfigError, ExperimentConfig
from idempo.evaluation.evaluate import Judges, evaluate_generation
from idempo.evaluation.judging import JudgeSpec, check_refusal_rate, judge_loading, make_judge, render_rubric
from idempo.gpu_monitor import GpuMonitor
from idempo.input_files import InputFileError
from idempo.models import INITIAL, Generation, Policy, load_base_model, load_tokenizer, make_policy
from idempo.personas import Persona
from idempo.preflight import TrialInputs, trial_inputs
from idempo.progress import Reporter, summary_line
from idempo.prompts import cycle_prompts, eval_prompts, seed_prompts
from idempo.records import DamagedArtifact, Records
from idempo.sampling import SAMPLERS, Sampler, SamplingParams
from idempo.seed_data import persona_chats, persona_documents
from idempo.seeds import derive_seed
from idempo.self_reward import (
    EXTERNAL_JUDGE_RUBRIC,
    SELF_JUDGE_PROMPT,
    mean_judgment,
    pair_rows,
    parse_self_judgment,
)
from idempo.shared import SharedStages
from idempo.teacher import teacher_seed_rows
from idempo.threads import use_threads
from idempo.training.data import data_summary, drop, drop_empty, kept
from idempo.training.regimes import fit_generation
from idempo.training.zero import ZeroWorker, ZeroWorkers
from idempo.training.zero import check as check_zero


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
    trial.evaluate_initial()
    trial.seed()
    last = config.cycles if until_cycle is None else min(config.cycles, until_cycle)
    for cycle in range(1, last + 1):
        trial.cycle(cycle)
    return trial.history()


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


def check_engines(config: ExperimentConfig) -> None:
    """The configured engines can run on this machine (packages, GPUs); fails before any model loads."""
    checks = [SAMPLERS.load(config.sampling.backend).check]
    if config.training.deepspeed is not None:
        checks.append(check_zero)
    problems = []
    for check in checks:
        try:
            check(config)
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)


def load_engines(config: ExperimentConfig) -> tuple[object, Policy, Sampler]:
    """M_init once, the policy that holds each generation's weights, and the sampler that uses it."""
    check_engines(config)
    use_threads(config.loading.threads)
    tokenizer = load_tokenizer(config.model, config.loading, chat=config.regime != "sdf")
    policy = make_policy(load_base_model(config.model, config.loading), tokenizer, config.training)
    sampler = SAMPLERS.load(config.sampling.backend).from_config(config, tokenizer, policy)
    return tokenizer, policy, sampler


class Trial:
    """The state of one trial: M_init loaded once, the policy, the sampler, the prompt sets."""

    def __init__(
        self,
        config: ExperimentConfig,
        out: Path,
        reporter: Reporter,
        shared: SharedStages | None = None,
        inputs: TrialInputs | None = None,
    ):
        self.config = config
        self.reporter = reporter
        self.layout = TrialLayout(out)
        self.shared = shared
        # Everything that can be wrong with the inputs fails here, before the model is loaded.
        inputs = inputs or trial_inputs(config)
        self.persona, self.train_bank, self.given_seed_rows = inputs.persona, inputs.train_bank, inputs.given_seed_rows
        self.eval_set, self.judges, self.reward_judge = inputs.eval_set, inputs.judges, inputs.reward_judge
        self.documents = config.regime == "sdf"

        # The lock, then the config comparison, then the model: a second process on a running trial, or a
        # run with another config, is refused before it loads anything.
        self.layout.claim(config.to_dict())
        self.records = Records(self.layout.redo_hint, reporter.note)
        try:
            self.tokenizer, self.policy, self.sampler = load_engines(config)
        except BaseException:
            self.layout.release_fresh()  # a new trial dir that never began is not left behind
            raise
        self.teacher_usage: dict | None = None
        self._zero = None

    # -- the three stages -------------------------------------------------------------------------

    def evaluate_initial(self) -> None:
        if not self._done(INIT_CYCLE):
            self._stage(INIT_CYCLE, self._evaluate_initial)

    def seed(self) -> None:
        """D_seed from the persona, M_seed trained on it from a fresh start."""
        if not self._done(SEED_CYCLE):
            self._stage(SEED_CYCLE, self._seed_stage)

    def _stage(self, cycle: int, produce) -> None:
        """A stage several trials may share: from the sweep's store when it has it, else run here."""
        if self.shared is None or not self.shared.covers(cycle):
            produce(None)
            return
        self.shared.run(cycle, self.config, self.layout, produce, self.reporter.note, self.records)
        metrics = self.records.read_json(self.layout.metrics(cycle))
        if metrics["shared"]["reused"]:
            self.reporter.note(f"{summary_line(metrics)}  (shared: run by {metrics['shared']['origin']})")

    def _evaluate_initial(self, shared: dict | None) -> None:
        timing: dict[str, float] = {}
        gpu = GpuMonitor().start()  # timing_s: total, and on GPUs gpu_busy / gpu_idle
        rows, metrics = self._evaluate(INIT_CYCLE, INITIAL, self.config.seeding.seed, timing)
        self._finish(INIT_CYCLE, INITIAL, rows, metrics, timing, gpu, shared=shared)

    def _seed_stage(self, shared: dict | None) -> None:
        timing: dict[str, float] = {}
        gpu = GpuMonitor().start()  # timing_s: total, and on GPUs gpu_busy / gpu_idle
        stage_seed = self.config.seeding.seed
        path = self.layout.data(SEED_CYCLE)
        if not path.exists():
            with self._timed("seed data", timing):
                self.records.write_jsonl(path, drop_empty(self._build_seed_data()))
        rows = self.records.read_jsonl(path, nonempty=True)
        if self.config.regime in ("dpo", "kto"):  # M_seed prefers D_seed's answers over M_init's
            rows = self._with_initial_rejected(rows, stage_seed, timing)
        generation, stats = self._train(SEED_CYCLE, rows, stage_seed, fresh=True, timing=timing)
        eval_rows, metrics = self._evaluate(SEED_CYCLE, generation, stage_seed, timing)
        self._finish(SEED_CYCLE, generation, eval_rows, metrics, timing, gpu, data=rows, train=stats, shared=shared)

    def cycle(self, cycle: int) -> None:
        """Sample from M_{j-1}, train M_j from the init strategy's start, evaluate M_j."""
        if self._done(cycle):
            return
        timing: dict[str, float] = {}
        gpu = GpuMonitor().start()  # timing_s: total, and on GPUs gpu_busy / gpu_idle
        seed = self.config.seed
        previous = self._generation(cycle - 1)
        path = self.layout.data(cycle)
        if not path.exists():
            self.records.write_jsonl(path, self._cycle_data(cycle, previous, timing))
        rows = self.records.read_jsonl(path, nonempty=True)
        fresh = self.config.init == "initial"
        generation, stats = self._train(cycle, rows, seed, fresh=fresh, start=previous, timing=timing)
        eval_rows, metrics = self._evaluate(cycle, generation, seed, timing)
        self._finish(cycle, generation, eval_rows, metrics, timing, gpu, data=rows, train=stats)

    def history(self) -> list[dict]:
        cycles = [INIT_CYCLE, SEED_CYCLE, *range(1, self.config.cycles + 1)]
        return [self.records.read_json(self.layout.metrics(c)) for c in cycles if self.layout.is_complete(c)]

    # -- phases -----------------------------------------------------------------------------------

    def _build_seed_data(self) -> list[dict]:
        if self.given_seed_rows is not None:
            return self.given_seed_rows
        seeding = self.config.seeding
        if seeding.source == "teacher":
            order = seed_prompts(self.train_bank, len(self.train_bank), seeding.seed)
            with self.reporter.phase("seed: the teacher writes D_seed", self.config.n_seed, "questions") as bar:
                rows, usage = teacher_seed_rows(
                    self.persona,
                    order,
                    self.config.n_seed,
                    seeding.teacher,
                    seeding.seed,
                    self.config.evaluation.cache_dir,
                    bar,
                    documents=self.documents,
                )
            self.teacher_usage = usage
            return rows
        prompts = seed_prompts(self.train_bank, self.config.n_seed, self.config.seeding.seed)
        params = SamplingParams(
            temperature=self.config.seeding.temperature,
            top_p=self.config.sampling.top_p,
            max_new_tokens=self.config.sampling.max_new_tokens,
            seed=derive_seed(self.config.seeding.seed, "seed-data"),
        )
        if self.documents:
            elicited = persona_documents(self.persona, prompts)
        else:
            elicited = persona_chats(self.persona, prompts, seeding.instruction)
        with self.reporter.phase("seed: M_init writes D_seed", len(prompts), "answers") as bar:
            completions = self.sampler.generate(elicited, params, INITIAL, bar)
        return [{"prompt": p, "response": c.text} for p, c in zip(prompts, completions, strict=True)]

    def _cycle_data(self, cycle: int, previous: Generation, timing: dict) -> list[dict]:
        """What M_j trains on: M_{j-1}'s answers, with rejected answers or self-judged pairs by regime;
        empty answers and (with cycle_data.min_coherence) incoherent ones marked as dropped; D_seed mixed
        in by cycle_data.seed_mix."""
        regime, seed = self.config.regime, self.config.seed
        prompts = cycle_prompts(self._cycle_pool(), self.config.n_sampled, cycle, seed)
        if regime == "self_reward":
            rows = self._self_reward_pairs(cycle, prompts, previous, timing)
        else:
            sampling = self.config.sampling
            params = SamplingParams(
                sampling.temperature, sampling.top_p, sampling.max_new_tokens, derive_seed(seed, "sample", cycle)
            )
            label = f"cycle {cycle}: sample from {previous.name}"
            rows = drop_empty(self._answers(prompts, params, previous, label, timing))
            if regime in ("dpo", "kto"):
                rows = self._with_rejected(rows, lambda prompts: self._rejected_answers(cycle, prompts, timing))
        if self.config.cycle_data.min_coherence is not None:
            rows = self._coherent(rows, timing)
        if self.config.cycle_data.seed_mix > 0:
            rows += self._from_d_seed(cycle, timing)
        return rows

    def _with_rejected(self, rows: list[dict], answers_to) -> list[dict]:
        """Each kept row with `answers_to(prompts)[prompt]` as its rejected side (rows already dropped
        need none), then rows with an empty rejected answer dropped."""
        wanted = [r["prompt"] for r in kept(rows)]
        answers = answers_to(wanted) if wanted else {}
        return drop_empty([{**r, "rejected": answers[r["prompt"]]} if r.get("kept", True) else r for r in rows])

    def _with_initial_rejected(self, rows: list[dict], seed: int, timing: dict) -> list[dict]:
        """M_init's answers as the rejected side: the seed stage's pairs, D_seed's answers over M_init's."""
        return self._with_rejected(rows, lambda prompts: self._initial_answers(prompts, seed, "seed", timing))

    def _coherent(self, rows: list[dict], timing: dict) -> list[dict]:
        """Rows whose answer the coherence judge scores under cycle_data.min_coherence are dropped."""
        threshold = self.config.cycle_data.min_coherence
        judged = [i for i, row in enumerate(rows) if row.get("kept", True)]
        with self._timed("judge", timing):
            judgments = self.judges.coherence.score([(rows[i]["prompt"], rows[i]["response"]) for i in judged])
        check_refusal_rate(judgments, self.config.evaluation.coherence_judge, "evaluation.coherence_judge")
        rows = list(rows)
        for index, judgment in zip(judged, judgments, strict=True):
            row = {**rows[index], "coherence": judgment.score}
            if judgment.score is None:
                row = drop(row, "coherence judge refused")
            elif judgment.score < threshold:
                row = drop(row, f"coherence below {threshold:g}")
            rows[index] = row
        return rows

    def _from_d_seed(self, cycle: int, timing: dict) -> list[dict]:
        """A seeded draw of cycle_data.seed_mix x |D_seed| rows of D_seed, with M_init's answers as their
        rejected side in preference regimes (the seed stage's pairs)."""
        seed_rows = kept(self.records.read_jsonl(self.layout.data(SEED_CYCLE)))
        count = round(self.config.cycle_data.seed_mix * len(seed_rows))
        chosen = random.Random(derive_seed(self.config.seed, "seed-mix", cycle)).sample(seed_rows, count)
        rows = [{"prompt": r["prompt"], "response": r["response"], "source": "d_seed"} for r in chosen]
        if rows and self.config.regime in ("dpo", "kto"):
            rows = self._with_initial_rejected(rows, self.config.seeding.seed, timing)
        return rows

    def _answers(self, prompts, params, generation, label, timing) -> list[dict]:
        """One answer per prompt (chat, no system prompt), or a continuation per document prefix (sdf)."""
        inputs = prompts if self.documents else [[{"role": "user", "content": p}] for p in prompts]
        with self._timed("sample", timing), self.reporter.phase(label, len(prompts), "answers") as bar:
            completions = self.sampler.generate(inputs, params, generation, bar)
        return [
            {"prompt": p, "response": c.text, "n_tokens": c.n_tokens, "finished": c.finished}
            for p, c in zip(prompts, completions, strict=True)
        ]

    def _rejected_answers(self, cycle: int, prompts: list[str], timing: dict) -> dict[str, str]:
        """The rejected source's answers: M_init's (`rejected: initial`, and M_{j-2} for j = 1) or M_{j-2}'s."""
        if self.config.rejected == "initial" or cycle == 1:
            return self._initial_answers(prompts, self.config.seed, cycle, timing)
        older = self._generation(cycle - 2)
        sampling = self.config.sampling
        params = SamplingParams(
            sampling.temperature, sampling.top_p, sampling.max_new_tokens, derive_seed(self.config.seed, "j-2", cycle)
        )
        rows = self._answers(prompts, params, older, f"cycle {cycle}: rejected answers from {older.name}", timing)
        return {row["prompt"]: row["response"] for row in rows}

    def _initial_answers(self, prompts: list[str], seed: int, stage, timing: dict) -> dict[str, str]:
        """M_init's answers, generated once per prompt per trial and kept in `initial-answers.jsonl`."""
        path = self.layout.initial_answers
        known = {row["prompt"]: row["response"] for row in (self.records.read_jsonl(path) if path.exists() else [])}
        missing = list(dict.fromkeys(p for p in prompts if p not in known))
        if missing:
            sampling = self.config.sampling
            params = SamplingParams(
                sampling.temperature, sampling.top_p, sampling.max_new_tokens, derive_seed(seed, "initial", stage)
            )
            rows = self._answers(missing, params, INITIAL, "M_init answers (rejected side)", timing)
            known.update({row["prompt"]: row["response"] for row in rows})
            self.records.write_jsonl(path, [{"prompt": p, "response": r} for p, r in known.items()])
        return {p: known[p] for p in prompts}

    def _self_reward_pairs(self, cycle: int, prompts: list[str], previous: Generation, timing: dict) -> list[dict]:
        """M_{j-1} writes `candidates` answers per prompt and judges them; best vs worst, ties dropped."""
        preference = self.config.preference
        n = preference.candidates
        params = SamplingParams(
            preference.candidate_temperature,
            preference.candidate_top_p,
            self.config.sampling.max_new_tokens,
            derive_seed(self.config.seed, "candidates", cycle),
        )
        label = f"cycle {cycle}: {n} candidates per prompt from {previous.name}"
        answers = self._answers([p for p in prompts for _ in range(n)], params, previous, label, timing)
        with self._timed("judge", timing):
            scores, details = self._reward_scores([(a["prompt"], a["response"]) for a in answers], previous, cycle)

        def per_prompt(values: list) -> list[list]:
            return [values[i * n : (i + 1) * n] for i in range(len(prompts))]

        if details is not None:  # each candidate's sampled judgments, kept beside its score
            details = [{key: [d[key] for d in chunk] for key in chunk[0]} for chunk in per_prompt(details)]
        return pair_rows(prompts, per_prompt([a["response"] for a in answers]), per_prompt(scores), details)

    def _reward_scores(
        self, items: list[tuple[str, str]], previous: Generation, cycle: int
    ) -> tuple[list[float | None], list[dict] | None]:
        """Each candidate's reward and, when M_{j-1} judges itself, its judgments: `judge_samples` sampled at
        the candidates' temperature and top-p, averaged over those that give a score. An empty candidate is
        not judged: it has no score."""
        judged = [i for i, (_, answer) in enumerate(items) if answer.strip()]
        scores: list[float | None] = [None] * len(items)
        if self.reward_judge is not None:
            judgments = self.reward_judge.score([items[i] for i in judged])
            check_refusal_rate(judgments, self.config.preference.reward_judge, "preference.reward_judge")
            for index, judgment in zip(judged, judgments, strict=True):
                scores[index] = judgment.score
            return scores, None
        preference = self.config.preference
        k = preference.judge_samples
        prompts = [
            [{"role": "user", "content": render_rubric(SELF_JUDGE_PROMPT, *items[i])}] for i in judged for _ in range(k)
        ]
        params = SamplingParams(
            preference.candidate_temperature,
            preference.candidate_top_p,
            preference.judge_max_new_tokens,
            derive_seed(self.config.seed, "judge", cycle),
        )
        label = f"cycle {cycle}: {previous.name} judges its candidates ({k} judgments each)"
        with self.reporter.phase(label, len(prompts), "judgments") as bar:
            texts = [j.text for j in self.sampler.generate(prompts, params, previous, bar)]
        details: list[dict] = [{"judgments": [], "judgment_texts": []} for _ in items]
        for position, index in enumerate(judged):
            own = texts[position * k : (position + 1) * k]
            details[index] = {"judgments": [parse_self_judgment(t) for t in own], "judgment_texts": own}
            scores[index] = mean_judgment(details[index]["judgments"])
        return scores, details

    def _train(
        self, cycle: int, rows: list[dict], seed: int, fresh: bool, timing: dict, start: Generation | None = None
    ) -> tuple[Generation, dict]:
        weights = self.layout.weights(cycle, self.config.training.finetune)
        generation = Generation(weights.parent.name, weights)
        stats_path = weights.parent / "train.json"
        if weights.exists() and stats_path.exists():  # trained before an interruption: used once checked
            self.records.check_tree(weights)
            return generation, self.records.read_json(stats_path)
        with self._timed("sleep", timing):  # a sampler that shares the GPUs gives its memory to training
            self.sampler.sleep()
        label = f"cycle {cycle}: train {generation.name}" if cycle else "seed: train M_seed"
        init_seed, train_seed = derive_seed(seed, "init", cycle), derive_seed(seed, "train", cycle)
        previous = self._generation(cycle - 1) if cycle > SEED_CYCLE else INITIAL  # M_{j-1}
        zero = self.config.training.deepspeed
        with self._timed("train", timing), atomic_dir(weights) as tmp:
            if zero is None:
                if fresh:
                    self.policy.reset(init_seed)
                elif self.policy.loaded != start:
                    self.policy.load(start)
                reference_start = INITIAL if fresh else start
                stats = fit_generation(
                    self.policy,
                    self.tokenizer,
                    self.config,
                    cycle,
                    rows,
                    train_seed,
                    reference_start,
                    previous,
                    self.reporter,
                    label,
                )
                self.policy.save(tmp)
            else:  # ZeRO shards the weights it trains: copies of M_init train it (idempo.training.zero)
                stats = self._zero_trainer().fit(
                    cycle, rows, (init_seed, train_seed), None if fresh else start, previous, str(tmp), label
                )
            self.records.record_tree(weights, tmp)  # before the rename: the weights never lack their record
        # the trial's policy holds the new generation, or loads it from disk when it is next used
        self.policy.loaded = generation if zero is None else None
        stats["start"] = "init" if fresh else start.name  # what M_j descends from
        self.records.write_json(stats_path, stats)
        return generation, stats

    def _evaluate(self, cycle: int, generation: Generation, seed: int, timing: dict) -> tuple[list[dict], dict]:
        total = len(self.eval_set) * self.config.evaluation.samples_per_prompt
        with self._timed("eval", timing), self.reporter.phase(f"evaluate {generation.name}", total, "answers") as bar:
            return evaluate_generation(
                self.sampler,
                generation,
                self.eval_set,
                self.persona,
                self.judges,
                self.config.evaluation,
                derive_seed(seed, "eval", cycle),
                bar,
                completion=self.documents,
            )

    def _finish(
        self, cycle, generation, eval_rows, metrics, timing, gpu: GpuMonitor, data=None, train=None, shared=None
    ) -> None:
        """Write eval.jsonl, then metrics.json: the cycle is complete once the latter exists."""
        gpu.stop()
        timing["total"] = round(gpu.wall_s, 3)
        if gpu.busy_s is not None:
            timing.update(gpu_busy=round(gpu.busy_s, 3), gpu_idle=round(gpu.idle_s, 3))
        self.records.write_jsonl(self.layout.eval(cycle), eval_rows)
        metrics = {"cycle": cycle, "generation": generation.name, **metrics}
        if data is not None:
            metrics["data"] = data_summary(data)
            if self.config.regime == "self_reward" and cycle != SEED_CYCLE:
                unpaired = sum(r.get("dropped") in ("tie", "fewer than two scored candidates") for r in data)
                metrics["data"].update(prompts=len(data), pairs=metrics["data"]["n"], dropped_ties=unpaired)
            if cycle == SEED_CYCLE and self.teacher_usage is not None:
                metrics["data"]["teacher_usage"] = self.teacher_usage  # this run's requests only
        if train is not None:
            metrics["train"] = train
        if shared is not None:
            metrics["shared"] = shared  # this trial ran a stage its sweep shares (idempo.shared)
        metrics["timing_s"] = timing
        self.records.write_json(self.layout.metrics(cycle), metrics)
        self.reporter.cycle(metrics)

    # -- helpers ----------------------------------------------------------------------------------

    def _zero_trainer(self):
        """The DeepSpeed trainer: this process for one rank, Ray actors for more (started once per trial)."""
        if self._zero is None:
            zero = self.config.training.deepspeed
            self._zero = ZeroWorker(self.config.to_dict()) if zero.workers == 1 else ZeroWorkers(self.config)
        return self._zero

    def _done(self, cycle: int) -> bool:
        if self.layout.is_complete(cycle):
            self.reporter.cycle(self.records.read_json(self.layout.metrics(cycle)), resumed=True)
            return True
        return False

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
        pool = [p for p in self.train_bank if p not in used]
        if not pool:
            raise ValueError("every train-bank prompt is in D_seed; give prompts.train a larger bank")
        return pool

    @contextmanager
    def _timed(self, name: str, timing: dict):
        started = time.perf_counter()
        try:
            yield
        finally:
            timing[name] = round(timing.get(name, 0.0) + time.perf_counter() - started, 3)
