"""`idempo report SWEEP_DIR`: figures, tables and a page that show a sweep at a glance.

Everything is read from the sweep's artifacts (see `results`), so a report can be written while the
sweep still runs; partial trials are marked as such. Written under `out`:

    index.html                      the page (opens from disk, no network)
    figures/trait-<persona>-<regime>.{png,svg}   figures/tradeoff.{png,svg}   figures.json
    trials.csv  trials.md           one row per trial (peak/final trait, verdict, stop reason, ...)
    replicas.csv                    one row per configuration, across its replicas
    cycles.csv                      every metric of every completed cycle, one row per (trial, cycle)
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from idempo.artifacts import write_json, write_text
from idempo.config import AmplificationConfig, ConfigError, describe_error
from idempo.report.figures import tradeoff_figure, trait_figures
from idempo.report.page import render_page
from idempo.report.results import SweepResults, load_results
from idempo.report.tables import cycle_rows, replica_rows, to_csv, to_markdown, trial_rows


def write_report(
    sweep_dir: str | Path,
    out: str | Path | None = None,
    facet: str = "n_sampled",
    hue: str = "n_seed",
    replicas: Literal["mean", "lines"] = "mean",
    amplification: dict[str, Any] | None = None,
) -> tuple[Path, SweepResults]:
    """Write the report; `amplification` overrides the trials' own amplification settings."""
    results = load_results(sweep_dir)
    check_axis_names(results, facet=facet, hue=hue)
    if amplification:  # a bad override is named before anything is written
        try:
            AmplificationConfig.model_validate(amplification)
        except ValidationError as err:
            raise ConfigError(
                [f"--amplification {describe_error(e, AmplificationConfig)}" for e in err.errors()]
            ) from None
    out = Path(out) if out is not None else results.directory / "report"
    trials = trial_rows(results, amplification)
    groups = replica_rows(results, trials)
    figures = trait_figures(results, out / "figures", facet, hue, replicas)
    figures.append(tradeoff_figure(results, trials, out / "figures"))
    write_text(out / "trials.csv", to_csv(trials))
    write_text(out / "trials.md", to_markdown(trials))
    write_text(out / "replicas.csv", to_csv(groups))
    write_text(out / "cycles.csv", to_csv(cycle_rows(results)))
    write_json(out / "figures.json", [asdict(f) | {"files": f.files} for f in figures])
    settings = {"facet": facet, "hue": hue, "replicas": replicas}
    if amplification:
        settings["amplification"] = ", ".join(f"{k}={v}" for k, v in amplification.items())
    write_text(out / "index.html", render_page(results, trials, groups, figures, settings))
    return out, results


def check_axis_names(results: SweepResults, **axes: str) -> None:
    known = results.config_keys
    problems = [
        f"--{option}: {value!r} is not a config field of these trials; the sweep's axes are "
        f"{', '.join(results.axes) or 'none'}"
        for option, value in axes.items()
        if value not in known
    ]
    if problems:
        raise ConfigError(problems)
