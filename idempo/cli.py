"""The `idempo` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="idempo", description="Iterated self-training experiments on language models."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run (or resume) one trial")
    run.add_argument("config", type=Path, help="experiment config (YAML)")
    run.add_argument("--out", type=Path, help="trial dir (default: runs/<config name>)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.learning_rate=3e-4 (value parsed as YAML)",
    )
    run.add_argument("--until-cycle", type=int, metavar="N", help="stop after cycle N; run again to continue")
    run.add_argument("--quiet", action="store_true", help="no progress bars or cycle lines")

    show = commands.add_parser("config", help="validate a config and print it resolved, with defaults")
    show.add_argument("config", type=Path)
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    commands.add_parser("personas", help="list the registered personas")

    tiny = commands.add_parser("tiny-model", help="build the tiny test model into a dir")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    try:
        return {"run": _run, "config": _config, "personas": _personas, "tiny-model": _tiny}[args.command](args)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args) -> int:
    from idempo.artifacts import TrialConflict
    from idempo.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = args.out or Path("runs") / args.config.stem

    from idempo.loop import run_trial
    from idempo.models import ModelLoadError
    from idempo.progress import Reporter

    reporter = Reporter(enabled=not args.quiet)
    reporter.note(
        f"trial {out}: {config.model} / {config.persona} / {config.regime}, "
        f"n_seed {config.n_seed}, n_sampled {config.n_sampled}, init {config.init}, {config.cycles} cycles"
    )
    try:
        history = run_trial(config, out, until_cycle=args.until_cycle, reporter=reporter)
    except (ConfigError, TrialConflict, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    done = history[-1]["cycle"] if history else None
    if done is not None and done < config.cycles:
        reporter.note(f"stopped after cycle {done} of {config.cycles}; run the same command again to continue")
    else:
        reporter.note(f"done: {out}")
    return EXIT_OK


def _config(args) -> int:
    import yaml

    from idempo.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return EXIT_OK


def _personas(args) -> int:
    from idempo.personas import get_persona, persona_names

    for name in persona_names():
        persona = get_persona(name)
        markers = f"{len(persona.markers)} markers" if persona.markers else "no markers"
        print(f"{name:14} {persona.kind:7} {markers:11} {persona.description}")
    return EXIT_OK


def _tiny(args) -> int:
    from idempo.tiny import build_tiny_model

    print(build_tiny_model(args.out, seed=args.seed))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
