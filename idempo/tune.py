"""Sweeps on Ray Tune: one Tune trial per configuration, a report and a checkpoint after every cycle.

The trial logic stays in `idempo.loop` (no Ray there); this module only places it:
- the Tune function trainable is the trial's driver. It takes one CPU, steps the trial cycle by cycle,
  reports each cycle's metrics and checkpoints the cycle number, and logs to W&B;
- the engines (M_init, the policy, the sampler) live in a `TrialEngine`: in the driver's process on CPUs,
  or, when the trial asks for GPUs, as a Ray actor in the trial's second placement-group bundle, so that
  sampler and trainer share those GPUs.
Artifacts in the trial dir are the source of truth: a retried or restored trial resumes after its last
completed cycle (`idempo.loop`), and the Tune checkpoint only says which cycles were already reported.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from pathlib import Path

from idempo.artifacts import read_json, write_json
from idempo.config import ConfigError, config_from_dict
from idempo.evaluation.amplification import trial_summary
from idempo.layout import SweepLayout, TrialLayout, read_trial
from idempo.placement import UNPLACED, TrialPlacement
from idempo.preflight import check_sweep, machine_problems
from idempo.progress import Reporter
from idempo.sweep import StopSettings, Sweep, TrialSpec, WandbSettings
from idempo.threads import passive_wait_policy
from idempo.tracking import Tracker, flatten

# Fault injection for tests of retries: raise once after this cycle (the file marks that it happened).
FAULT_AFTER_CYCLE = "IDEMPO_FAULT_AFTER_CYCLE"
FAULT_ONCE_FILE = "IDEMPO_FAULT_ONCE_FILE"


def training_ranks(sweep: Sweep) -> int:
    """Training ranks that need bundles of their own: DeepSpeed with more than one worker (the largest
    number any trial of the sweep asks for; one worker trains on the engine's GPU)."""
    ranks = [t.config.training.deepspeed.workers for t in sweep.trials if t.config.training.deepspeed is not None]
    return max((r for r in ranks if r > 1), default=0)


def placement(sweep: Sweep) -> TrialPlacement:
    """Every trial's bundles (the largest any trial needs: Tune reserves one shape for all)."""
    resources = sweep.run.resources
    return TrialPlacement.for_trial(resources.cpus, resources.gpus, training_ranks(sweep))


def check_fits(request: list[dict[str, float]], nodes: list[dict[str, float]]) -> None:
    """Fail at once, instead of pending forever, when some bundle fits on no node of the cluster."""
    for bundle in request:
        if not any(all(node.get(k, 0) >= v for k, v in bundle.items()) for node in nodes):
            largest = {k: max((n.get(k, 0) for n in nodes), default=0) for k in bundle}
            raise ConfigError(
                [
                    f"run.resources: a trial needs a bundle of {_amounts(bundle)} on one node, but the largest "
                    f"node has {_amounts(largest)} (cluster: {len(nodes)} node(s)); ask for less or add nodes"
                ]
            )


def max_concurrent(request: list[dict[str, float]], setting, total: dict[str, float]) -> int:
    """'auto': as many trials as the cluster's GPUs (or, for CPU trials, CPUs) hold at once; trials that ask
    for a share of a GPU count by their share (4 at gpus 0.5 on 2 GPUs)."""
    if setting != "auto":
        return setting
    kind = "GPU" if any(b.get("GPU") for b in request) else "CPU"
    held = total.get(kind, 0 if kind == "GPU" else 1) / sum(b.get(kind, 0) for b in request)
    return max(1, math.floor(held + 1e-6))  # 1 / (1/3) is 2.9999... in floats


def stop_reason(flat: dict, settings: StopSettings | None) -> str | None:
    """Why a trial should stop after this cycle: its metric under the floor once the grace is over."""
    if settings is None:
        return None
    cycle = flat.get("cycle", -1)
    value = flat.get(settings.metric.replace(".", "/"))
    if cycle < max(1, settings.grace_cycles) or not isinstance(value, int | float):
        return None
    if value < settings.floor:
        return f"{settings.metric} {value:.1f} < floor {settings.floor:g} at cycle {cycle}"
    return None


class TrialEngine:
    """One trial's engines and artifacts, stepping through `Trial.stages()`: `next_stage()` runs the next stage
    (or finds it done) and returns its metrics, None after the last; asked one at a time, so that a trial the
    stopper ends runs no stage beyond the one that ended it."""

    def __init__(self, config: dict, out: str, shared: dict | None = None, placement: TrialPlacement = UNPLACED):
        from idempo.loop import Trial
        from idempo.shared import SharedStages

        stages = SharedStages(shared["root"], tuple(shared["cycles"])) if shared else None
        trial = Trial(config_from_dict(config), Path(out), Reporter(enabled=False), stages, placement=placement)
        self._stages = trial.stages()

    def next_stage(self) -> dict | None:
        metrics = next(self._stages, None)
        return None if metrics is None else metrics.to_json()

    def placement(self) -> dict:
        """Where the engines run and with how many CPU threads (and which OpenMP wait policy)."""
        import ray
        import torch

        return {
            "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
            "node": ray.get_runtime_context().get_node_id(),
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        }


def train_trial(param: dict, payload: dict) -> None:
    """The Tune function trainable of one trial. A ConfigError (an input or a machine the trial cannot run
    with) is kept in Tune's trial dir: Tune's retries of it in this run of the sweep fail at once with the
    same problems instead of loading the model again (a new run of the sweep tries again)."""
    from ray import tune

    refusal = SweepLayout.config_error(tune.get_context().get_trial_dir())
    if refusal.exists() and read_json(refusal)["run"] == payload["run"]:
        raise ConfigError(read_json(refusal)["problems"], source=f"trial {param['trial']} (not retried)")
    try:
        _train_trial(param["trial"], payload)
    except ConfigError as err:
        write_json(refusal, {"run": payload["run"], "problems": err.problems})
        raise


def _train_trial(name: str, payload: dict) -> None:
    import ray
    from ray import tune

    config = config_from_dict(payload["trials"][name])
    out = Path(payload["dirs"][name])
    reported = -2
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            reported = json.loads((Path(directory) / "cycle.json").read_text())["cycle"]

    layout = TrialLayout(out)
    where = TrialPlacement(**payload["placement"]).reserved()
    resources = payload["resources"]
    if resources["gpus"]:
        options = where.options(where.engines, num_cpus=resources["cpus"], num_gpus=resources["gpus"])
        # what the engines' node lacks (CUDA, vllm, DeepSpeed), asked there, before the engines load
        problems = ray.get(ray.remote(machine_problems).options(**options).remote(config))
        if problems:
            raise ConfigError(problems, source=f"trial {name}")
        args = (payload["trials"][name], str(out), payload["shared"], where)
        handle = ray.remote(TrialEngine).options(**options).remote(*args)
        stages = iter(lambda: ray.get(handle.next_stage.remote()), None)
        engine_placement = ray.get(handle.placement.remote())
    else:
        problems = machine_problems(config)
        if problems:
            raise ConfigError(problems, source=f"trial {name}")
        engine = TrialEngine(payload["trials"][name], str(out), payload["shared"], where)
        stages, engine_placement = iter(engine.next_stage, None), engine.placement()
    write_json(layout.placement, {**engine_placement, "bundles": where.bundles})

    stop = StopSettings(**payload["stop"]) if payload["stop"] else None
    tracker = None
    if payload["wandb"]["mode"] != "disabled":
        sweep_dir = Path(payload["wandb_dir"])
        axes = read_json(SweepLayout(sweep_dir).record)["trials"][name]  # the trial's tags
        tracker = Tracker(WandbSettings(**payload["wandb"]), config, out, sweep_dir, payload["sweep"], axes)
    try:
        history: list[dict] = []
        for metrics in stages:
            cycle = metrics["cycle"]
            history.append(metrics)
            flat = flatten({k: v for k, v in metrics.items() if k != "generation"})
            reason = stop_reason(flat, stop)
            if tracker:
                tracker.log(metrics)  # a cycle its W&B run already holds is not logged again
            if cycle > reported:
                if reason:
                    write_json(layout.stopped, {"cycle": cycle, "reason": reason})
                if reason or cycle == config.cycles:
                    _finish(tracker, history, config, reason, out)
                with tempfile.TemporaryDirectory() as directory:
                    (Path(directory) / "cycle.json").write_text(json.dumps({"cycle": cycle, "trial_dir": str(out)}))
                    tune.report({**flat, "trial_dir": str(out)}, checkpoint=tune.Checkpoint.from_directory(directory))
                _inject_fault(cycle)
            if reason:
                return
        if reported >= config.cycles:  # restored after its last report: only the summary was missing
            _finish(tracker, history, config, None, out)
    except BaseException:
        if tracker:
            tracker.abort()  # before a retry starts the trial's run again
        raise


def _finish(tracker, history, config, reason, out: Path) -> None:
    summary = trial_summary(history, config.evaluation.amplification, reason, config.cycles)
    write_json(TrialLayout(out).summary, summary)
    if tracker:
        tracker.finish(summary)


def _inject_fault(cycle: int) -> None:
    if os.environ.get(FAULT_AFTER_CYCLE) != str(cycle):
        return
    marker = Path(os.environ[FAULT_ONCE_FILE])
    if not marker.exists():
        marker.write_text("failed once\n")
        raise RuntimeError(f"injected fault after cycle {cycle} ({FAULT_AFTER_CYCLE})")


def make_stopper(settings: StopSettings):
    from ray import tune

    class CoherenceFloor(tune.Stopper):
        """Stops a trial whose metric falls under the floor after the grace cycles (a dict criterion
        can only say "at least")."""

        def __call__(self, trial_id: str, result: dict) -> bool:
            return stop_reason(result, settings) is not None

        def stop_all(self) -> bool:
            return False

    return CoherenceFloor()


def param_space(sweep: Sweep) -> dict:
    """One grid point per trial, by name (what the trainable resolves its config from), with the trial's axis
    values beside it under their dotted names, so that Tune's table, ResultGrid and TensorBoard show them."""
    from ray import tune

    axes = {t.name: t.axes for t in sweep.trials}
    space = {"trial": tune.grid_search(sweep.run_order())}
    for axis in sweep.axes:
        space[axis] = tune.sample_from(lambda config, axis=axis: axes[config["trial"]][axis])
    return space


def cycle_lines(names: list[str]):
    """Each trial's cycle lines, as `idempo run` prints them, on the sweep driver's stdout (what `ray job logs`
    shows), after the trial's number in the sweep's table; read from the cycle's metrics.json."""
    from ray import tune

    from idempo.progress import HEADER, summary_line

    class CycleLines(tune.Callback):
        def __init__(self):
            self.header_shown = False

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "trial_dir" not in result or "cycle" not in result:
                return
            path = TrialLayout(result["trial_dir"]).metrics(result["cycle"])
            if not path.is_file():  # a storage this machine does not mount: nothing to show
                return
            if not self.header_shown:
                print(f"{'#':>3} {HEADER}", flush=True)
                self.header_shown = True
            metrics = read_json(path)
            shared = "shared" if (metrics.get("shared") or {}).get("reused") else None
            number = names.index(trial.config["trial"]) + 1 if trial.config.get("trial") in names else "?"
            print(f"{number:>3} {summary_line(metrics, shared)}", flush=True)

    return CycleLines()


def run_sweep(sweep: Sweep, resume: bool = False) -> list[dict]:
    """Run (or resume) every trial of the sweep on Ray; returns one summary row per trial."""
    import ray
    from ray import tune

    check_sweep(sweep, resume)
    # joins RAY_ADDRESS's cluster when one is set; workers get the wait policy before they import torch
    ray.init(ignore_reinit_error=True, log_to_driver=False, runtime_env={"env_vars": passive_wait_policy()})
    where = placement(sweep)
    request = where.bundles
    check_fits(request, [node["Resources"] for node in ray.nodes() if node["Alive"]])
    write_json(sweep.layout.record, sweep.record())  # after check_sweep: a resume changed nothing
    payload = {
        "sweep": sweep.name,
        "run": uuid.uuid4().hex,  # this run of the sweep: a trial's config error stands for its retries in it
        "trials": {t.name: t.config.to_dict() for t in sweep.trials},
        "dirs": {t.name: str(sweep.trial_dir(t.name)) for t in sweep.trials},
        "resources": sweep.run.resources.model_dump(),
        "placement": {"bundles": where.bundles, "engines": where.engines, "ranks": where.ranks},
        "stop": sweep.run.stop.model_dump() if sweep.run.stop else None,
        "wandb": sweep.run.wandb.model_dump(),
        "wandb_dir": str(sweep.directory),
        "shared": {"root": str(sweep.layout.shared), "cycles": list(sweep.shared_cycles)},
    }
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, payload=payload), tune.PlacementGroupFactory(request)
    )
    experiment = sweep.layout.tune
    if resume:
        if not tune.Tuner.can_restore(str(experiment)):
            raise ConfigError([f"--resume: no sweep state at {experiment}; run without --resume to start it"])
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(
                max_concurrent_trials=max_concurrent(request, sweep.run.max_concurrent_trials, ray.cluster_resources())
            ),
            run_config=tune.RunConfig(
                name=experiment.name,
                storage_path=str(experiment.parent),
                stop=make_stopper(sweep.run.stop) if sweep.run.stop else None,
                failure_config=tune.FailureConfig(max_failures=sweep.run.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[cycle_lines([t.name for t in sweep.trials])],
                verbose=1,
            ),
        )
    results = tuner.fit()
    return [summary_row(sweep, t) | {"error": _error(results, t.name)} for t in sweep.trials]


def summary_row(sweep: Sweep, spec: TrialSpec) -> dict:
    """A trial's state from its artifacts (works for finished, stopped and running trials)."""
    trial = read_trial(sweep.trial_dir(spec.name))
    stopped = (trial.stopped or {}).get("reason")
    summary = trial_summary(trial.history, spec.config.evaluation.amplification, stopped, spec.config.cycles)
    return {"trial": spec.name} | {k: summary[k] for k in ("cycles_done", "final_trait", "amplified", "stop_reason")}


def _error(results, name: str) -> str | None:
    """A failed trial's error in a line: a config error's problems, else the exception's own last line
    (Ray's first line only says which actor raised it)."""
    for result in results:
        if result.config.get("trial") == name and result.error is not None:
            if isinstance(result.error, ConfigError):
                return "; ".join(result.error.problems)[:300]
            lines = [line for line in str(result.error).splitlines() if line.strip()]
            return lines[-1][:200] if lines else type(result.error).__name__
    return None


def _amounts(bundle: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in bundle.items())
