"""The `idempo` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from idempo.threads import passive_wait_policy

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: list[str] | None = None) -> int:
    from idempo import __version__

    parser = argparse.ArgumentParser(
        prog="idempo", description="Iterated self-training experiments on language models."
    )
    parser.add_argument("--version", action="version", version=f"idempo {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run (or resume) one trial")
    run.add_argument("config", type=Path, help="experiment config (YAML)")
    run.add_argument("--out", type=Path, help="trial dir (default: runs/<config name>)")
    _overrides(run)
    run.add_argument("--until-cycle", type=int, metavar="N", help="stop after cycle N; run again to continue")
    run.add_argument("--quiet", action="store_true", help="no progress bars or cycle lines")
    run.add_argument("--wandb", metavar="PROJECT", help="log the trial to this W&B project (one run, resumed with it)")
    run.add_argument("--wandb-entity", metavar="ENTITY", help="W&B entity (default: yours)")
    run.add_argument(
        "--wandb-mode",
        choices=["auto", "online", "offline"],
        default="auto",
        help="auto: online when W&B has credentials (WANDB_API_KEY or `wandb login`), else offline in OUT/wandb",
    )
    run.add_argument("--wandb-upload", action="store_true", help="upload weights and D_seed, not references")

    show = commands.add_parser(
        "config", help="validate a config and print it resolved, with defaults (a sweep file: its trials)"
    )
    show.add_argument("config", type=Path, nargs="?", help="experiment config or sweep file (YAML)")
    show.add_argument("--explain", action="store_true", help="describe every field of configs and sweep files")
    _overrides(show)

    evaluate = commands.add_parser("eval", help="score a saved generation (or M_init) again")
    evaluate.add_argument("config", type=Path, help="experiment config (YAML): model, persona, evaluation")
    evaluate.add_argument("--adapter", type=Path, help="the generation's weights dir (default: M_init)")
    evaluate.add_argument("--out", type=Path, help="where eval.jsonl and metrics.json go (default: next to --adapter)")
    _overrides(evaluate)
    evaluate.add_argument("--quiet", action="store_true")

    calibrate = commands.add_parser("calibrate", help="binary-search the n_seed at which M_seed reaches a trait score")
    calibrate.add_argument("config", type=Path)
    calibrate.add_argument("--target", type=float, required=True, help="trait score to reach, 0-100")
    calibrate.add_argument("--low", type=int, default=1, help="smallest n_seed to consider")
    calibrate.add_argument("--high", type=int, help="largest n_seed to consider (default: the config's n_seed)")
    calibrate.add_argument("--tolerance", type=float, default=5.0, help="stop when a probe is this close")
    calibrate.add_argument("--max-probes", type=int, default=8)
    calibrate.add_argument("--out", type=Path, help="probe trials go here (default: runs/calibrate-<config name>)")
    _overrides(calibrate)
    calibrate.add_argument("--quiet", action="store_true")

    sweep = commands.add_parser("sweep", help="run a grid of trials on Ray Tune (a local Ray starts by itself)")
    sweep.add_argument("sweep", type=Path, help="sweep file (YAML)")
    sweep.add_argument(
        "--dry-run", action="store_true", help="validate every trial, print them, the resources and the cost"
    )
    sweep.add_argument("--resume", action="store_true", help="resume an interrupted sweep (Tuner.restore)")

    status = commands.add_parser(
        "status", help="each trial's state: pending, running (stage, phase), stopped, failed or done"
    )
    status.add_argument("directory", type=Path, help="a sweep's dir (<storage_path>/<sweep name>) or a trial dir")
    status.add_argument(
        "--watch", type=float, metavar="SECONDS", help="print it again every SECONDS until no trial is left to run"
    )

    report = commands.add_parser(
        "report", help="a summary, figures, tables and sampled answers of a sweep (running or done), a run, or several"
    )
    report.add_argument(
        "dirs",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="a sweep's dir (<storage_path>/<sweep name>) or an `idempo run` dir; several: the sweep becomes an axis",
    )
    report.add_argument("--out", type=Path, help="where the report goes (default: DIR/report; ./report for several)")
    placed = " (default: picked from the axes, at most 8 lines a panel)"
    report.add_argument("--rows", help="config field with one row of panels per value" + placed)
    report.add_argument("--cols", help="config field with one column of panels per value" + placed)
    report.add_argument("--facet", help="the former name of --cols")
    report.add_argument("--hue", help="config field with one line colour per value" + placed)
    report.add_argument("--style", help="config field with one line style per value" + placed)
    report.add_argument("--tradeoff-color", help="config field that colours the trade-off plot (default: the hue)")
    report.add_argument(
        "--replicas",
        choices=["mean", "lines"],
        default="mean",
        help="trials that differ only in seed: their mean and CI, or also each replica's own line",
    )
    report.add_argument(
        "--answers", type=int, default=3, help="sampled answers per generation, of one replica per configuration"
    )
    report.add_argument(
        "--amplification",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the trials' amplification settings, e.g. criterion=ci sustained_cycles=2 threshold=0",
    )
    report.add_argument("--wandb", action="store_true", help="also create a W&B report of the sweep's runs")
    report.add_argument("--wandb-project", help="W&B project (default: the sweep's)")
    report.add_argument("--wandb-entity", help="W&B entity (default: the sweep's, or your default)")

    bench = commands.add_parser(
        "bench",
        help="measure the sampler and trainer engines on this machine (defaults: a GPU's with CUDA, "
        "small CPU sizes without; what cannot run here is skipped, with why)",
    )
    if (sys.argv[1:] if argv is None else argv)[:1] == ["bench"]:  # its options load torch: only when asked
        from idempo.bench import add_options

        add_options(bench)

    commands.add_parser("personas", help="list the registered personas")

    commands.add_parser("models", help="the models idempo fetches by name, offline (docs/models.md)")

    tiny = commands.add_parser("tiny-model", help="build the tiny test model into a dir")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    passive_wait_policy()  # before anything imports torch
    try:
        handler = {
            "run": _run,
            "eval": _eval,
            "calibrate": _calibrate,
            "sweep": _sweep,
            "status": _status,
            "report": _report,
            "bench": _bench,
            "config": _config,
            "personas": _personas,
            "models": _models,
            "tiny-model": _tiny,
        }[args.command]
        return _reporting_errors(handler, args)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def _overrides(command) -> None:
    help = "override a config key, e.g. --set training.learning_rate=3e-4 (value parsed as YAML)"
    command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _reporting_errors(handler, args) -> int:
    """Bad input exits 2; a judge or teacher endpoint that keeps failing, a judge that refuses (nearly)
    every answer, a named model that cannot be fetched, a generation left with nothing to train on, or an
    artifact damaged since it was written, exits 1; each with one message."""
    from idempo.config import ConfigError
    from idempo.data import NothingToTrain
    from idempo.endpoint import EndpointError
    from idempo.evaluation.judging import TooManyRefusals
    from idempo.layout import TrialConflict
    from idempo.models import ModelLoadError
    from idempo.named_models import NamedModelError
    from idempo.records import DamagedArtifact

    try:
        return handler(args)
    except (ConfigError, TrialConflict, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (EndpointError, TooManyRefusals, NothingToTrain, NamedModelError, DamagedArtifact) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED


def _run(args) -> int:
    from idempo.config import load_config
    from idempo.evaluation.amplification import trial_summary
    from idempo.loop import Trial
    from idempo.preflight import check_trial
    from idempo.progress import Reporter
    from idempo.sweep import WandbSettings
    from idempo.tracking import Tracker

    config = load_config(args.config, args.overrides)
    out = args.out or Path("runs") / args.config.stem
    inputs = check_trial(config, out)

    reporter = Reporter(enabled=not args.quiet)
    reporter.note(
        f"trial {out}: {config.model} / {config.persona} / {config.regime}, "
        f"n_seed {config.n_seed}, n_sampled {config.n_sampled}, init {config.init}, {config.cycles} cycles"
    )
    trial = Trial(config, out, reporter, inputs=inputs)  # holds the trial dir from here on
    tracker = None
    if args.wandb:
        settings = WandbSettings(
            project=args.wandb, entity=args.wandb_entity, mode=args.wandb_mode, upload_artifacts=args.wandb_upload
        )
        tracker = Tracker(settings, config, out)
    history = []
    try:
        for metrics in trial.stages(args.until_cycle):
            history.append(metrics.to_json())
            if tracker:
                tracker.log(history[-1])
    except BaseException:
        if tracker:
            tracker.abort()
        raise
    if tracker:
        tracker.finish(trial_summary(history, config.evaluation.amplification, None, config.cycles))
    done = history[-1]["cycle"] if history else None
    if done is not None and done < config.cycles:
        reporter.note(f"stopped after cycle {done} of {config.cycles}; run the same command again to continue")
    else:
        reporter.note(f"done: {out}")
    return EXIT_OK


def _eval(args) -> int:
    import json

    from idempo.config import ConfigError, load_config
    from idempo.layout import TrialLayout
    from idempo.preflight import check_trial
    from idempo.progress import Reporter
    from idempo.reevaluate import reevaluate

    config = load_config(args.config, args.overrides)
    if args.out is None and args.adapter is None:
        raise ConfigError(["--out: required when evaluating M_init (no --adapter)"])
    check_trial(config)
    out = args.out or TrialLayout.reevaluation(args.adapter)
    metrics = reevaluate(config, args.adapter, out, Reporter(enabled=not args.quiet))
    headline = {k: metrics[k] for k in ("trait", "coherence", "refusal_rate", "branching_factor") if k in metrics}
    headline.get("branching_factor", {}).pop("nll_curve", None)
    print(json.dumps(headline, indent=2))
    print(f"written: {out / 'eval.jsonl'}, {out / 'metrics.json'}", file=sys.stderr)
    return EXIT_OK


def _calibrate(args) -> int:
    from idempo.calibrate import calibrate
    from idempo.config import load_config
    from idempo.preflight import check_trial
    from idempo.progress import Reporter

    config = load_config(args.config, args.overrides)
    check_trial(config)
    out = args.out or Path("runs") / f"calibrate-{args.config.stem}"
    summary = calibrate(
        config, args.target, out, args.low, args.high, args.tolerance, args.max_probes, Reporter(enabled=not args.quiet)
    )
    best = summary["best"]
    if best is None:
        print("no probe gave a trait score (every answer was a refusal)", file=sys.stderr)
        return EXIT_FAILED
    found = f"n_seed {best['n_seed']}: trait {best['trait']:.1f} (target {args.target:g}); probes in {out}"
    if not summary["reached"]:
        print(
            f"target not reached: no probe within --tolerance {args.tolerance:g} of {args.target:g}; the closest, "
            f"{found} (give more --max-probes, a wider --low/--high, or a larger --tolerance)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(found)
    return EXIT_OK


def _sweep(args) -> int:
    from idempo.cost import estimate
    from idempo.preflight import check_sweep
    from idempo.sweep import load_sweep

    sweep = load_sweep(args.sweep)
    check_sweep(sweep, args.resume)  # what run_sweep checks first: every trial, before Ray starts
    print(sweep_table(sweep))
    print("\n".join(estimate(sweep).lines()), flush=True)
    if args.dry_run:
        return EXIT_OK
    from idempo.tune import run_sweep

    rows = run_sweep(sweep, resume=args.resume)
    print(_table(["trial", "cycles_done", "final_trait", "amplified", "stop_reason", "error"], rows))
    print(f"trials in {sweep.layout.trials}", file=sys.stderr)
    return EXIT_FAILED if any(row["error"] for row in rows) else EXIT_OK


def _status(args) -> int:
    import time

    from idempo.status import render, settled

    try:
        while True:
            text, states = render(args.directory)
            if args.watch:
                clear = "\033[H\033[J" if sys.stdout.isatty() else "\n"
                text = f"{clear}{args.directory} at {time.strftime('%H:%M:%S')}\n{text}"
            print(text, flush=True)
            if not args.watch or settled(states):
                return EXIT_OK
            time.sleep(args.watch)
    except KeyboardInterrupt:  # how a watch ends
        return EXIT_OK


def _report(args) -> int:
    from idempo.config import ConfigError, apply_overrides
    from idempo.report import write_report

    if args.wandb and len(args.dirs) > 1:
        raise ConfigError(["--wandb: a W&B report is of one sweep; give one DIR"])
    amplification = apply_overrides({}, args.amplification, "--amplification")
    roles = {key: getattr(args, key) for key in ("rows", "cols", "facet", "hue", "style", "tradeoff_color")}
    out, results = write_report(
        args.dirs, args.out, **roles, replicas=args.replicas, amplification=amplification, answers=args.answers
    )
    statuses = [t.status for t in results.trials]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
    print(f"report of {results.name} ({len(statuses)} trials: {counts}): {out / 'index.html'}")
    if args.wandb:
        from idempo.report.wandb_report import publish

        mode = (results.wandb or {}).get("mode", "auto")
        print(publish(results, mode, args.wandb_project, args.wandb_entity))
    return EXIT_OK


def _bench(args) -> int:
    from idempo.bench import run_bench, settings_from, table

    settings = settings_from(args)
    results = run_bench(settings, say=lambda line: print(line, file=sys.stderr, flush=True))
    print(table(results))
    print(f"written: {settings.out}", file=sys.stderr)
    unloaded = [model for model, measured in results["models"].items() if "error" in measured]
    if unloaded:
        print(f"error: could not load {', '.join(unloaded)} (see {settings.out})", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def sweep_table(sweep) -> str:
    from idempo.tune import placement

    rows = [
        {"#": i, "trial": t.name, **t.axes, "model": t.config.model, "regime": t.config.regime}
        for i, t in enumerate(sweep.trials, 1)
    ]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    resources = sweep.run.resources
    request = placement(sweep).bundles
    lines = [
        f"sweep {sweep.name}: {len(sweep.trials)} trials -> {sweep.directory}",
        _table(columns, rows),
        f"each trial asks for the placement group {request} "
        f"({sum(b.get('CPU', 0) for b in request):g} CPUs, {resources.gpus:g} GPUs); "
        f"in all {len(sweep.trials) * resources.gpus:g} GPU-trials; max_concurrent_trials: "
        f"{sweep.run.max_concurrent_trials}",
        shared_stages_line(sweep),
    ]
    return "\n".join(lines)


def shared_stages_line(sweep) -> str:
    """How often each shared stage runs: once per group of trials that read the same inputs."""
    groups = sweep.stage_groups()
    n = len(sweep.trials)

    def times(count: int) -> str:
        return "once" if count == 1 else f"{count} times"

    seed = times(len(groups["seed"])) if "seed" in groups else f"{times(n)} (retrain_seed_model: each trial its own)"
    return (
        f"shared stages for {n} trials: M_init evaluated {times(len(groups['init']))}, M_seed trained {seed} "
        f"(in {sweep.layout.shared})"
    )


def _table(columns: list[str], rows: list[dict]) -> str:
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _config(args) -> int:
    import yaml

    from idempo.config import ConfigError, apply_overrides, config_from_dict, defaults_applied, read_yaml_mapping
    from idempo.preflight import check_trial

    if args.explain:
        from idempo.config import ExperimentConfig, explain
        from idempo.sweep import SweepFile

        print("\n".join(["# experiment config", *explain(ExperimentConfig), "", "# sweep file", *explain(SweepFile)]))
        return EXIT_OK
    if args.config is None:
        raise ConfigError(["config: give an experiment config file, or --explain"])

    raw = read_yaml_mapping(args.config, "config")
    if SWEEP_KEYS & raw.keys():
        return _sweep_config(args)
    raw = apply_overrides(raw, args.overrides)
    config = config_from_dict(raw, source=str(args.config))
    check_trial(config, machine=False)  # the inputs it reads; what the machine needs is checked where it runs
    for source, applied in defaults_applied(raw):
        settings = ", ".join(f"{key}={value}" for key, value in applied.items())
        where = "docs/models.md" if source.startswith("model") else "docs/loop.md"
        print(f"# {source} sets, where this config does not: {settings} ({where})")
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return EXIT_OK


SWEEP_KEYS = {"axes", "config", "base"}  # top-level keys of a sweep file that no experiment config has


def _sweep_config(args) -> int:
    """A sweep file given to `idempo config`: every trial validated, the trial table, the first trial's config."""
    import yaml

    from idempo.config import ConfigError
    from idempo.preflight import check_sweep
    from idempo.sweep import load_sweep

    if args.overrides:
        raise ConfigError([f"--set: {args.config} is a sweep file; set keys in its config: section instead"])
    sweep = load_sweep(args.config)
    check_sweep(sweep)
    first = sweep.trials[0]
    print(f"# {args.config} is a sweep file (its axes and config: over base); every trial is valid")
    print("\n".join(f"# {line}" for line in sweep_table(sweep).splitlines()))
    print(f"# trial {first.name}, resolved; the others differ in their axis values")
    print(yaml.safe_dump(first.config.to_dict(), sort_keys=False), end="")
    return EXIT_OK


def _personas(args) -> int:
    from idempo.personas import get_persona, persona_names

    for name in persona_names():
        persona = get_persona(name)
        markers = f"{len(persona.markers)} markers" if persona.markers else "no markers"
        print(f"{name:14} {persona.kind:7} {markers:11} {persona.description}")
    return EXIT_OK


def _models(args) -> int:
    from idempo.named_models import describe_models

    print(describe_models())
    return EXIT_OK


def _tiny(args) -> int:
    from idempo.tiny import build_tiny_model

    print(build_tiny_model(args.out, seed=args.seed))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
