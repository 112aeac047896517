"""`idempo report DIR [DIR ...]`: a summary, figures, tables and sampled answers that show a sweep at a glance.

DIR is a sweep's dir, or an `idempo run` dir (a report of one trial); several DIRs make one report with
the sweep as an axis (`sweep`), e.g. two sweeps that differ in `retrain_seed_model`. Everything is read
from the artifacts (see `results`), so a report can be written while a sweep still runs; partial trials
are marked as such. Written under `out`:

    index.html                      the page (opens from disk, no network)
    summary.csv                     per value of each varying axis: trials, amplified k/n, median trait change
    figures/<metric>-<persona>-<regime>.{png,svg}   figures/tradeoff.{png,svg}   figures.json
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
from idempo.report.figures import figure_layout, metric_figures, tradeoff_figure
from idempo.report.page import render_page
from idempo.report.results import SweepResults, load_results
from idempo.report.tables import cycle_rows, replica_rows, summary_rows, to_csv, to_markdown, trial_rows


def write_report(
    directories: str | Path | list[str | Path],
    out: str | Path | None = None,
    *,
    rows: str | None = None,
    cols: str | None = None,
    hue: str | None = None,
    style: str | None = None,
    tradeoff_color: str | None = None,
    facet: str | None = None,
    replicas: Literal["mean", "lines"] = "mean",
    amplification: dict[str, Any] | None = None,
    answers: int = 3,
) -> tuple[Path, SweepResults]:
    """Write the report. Roles no option names are picked from the axes (`figures.pick_layout`); `facet`
    is the former name of `cols`; `amplification` overrides the trials' own amplification settings;
    `answers` sampled answers per generation are shown, 0 for none."""
    results = load_results(directories)
    chosen = {"rows": rows, "cols": cols or facet, "hue": hue, "style": style}
    check_axis_names(results, rows=rows, cols=cols, facet=facet, hue=hue, style=style, tradeoff_color=tradeoff_color)
    if amplification:  # a bad override is named before anything is written
        try:
            AmplificationConfig.model_validate(amplification)
        except ValidationError as err:
            raise ConfigError(
                [f"--amplification {describe_error(e, AmplificationConfig)}" for e in err.errors()]
            ) from None
    if out is None:
        out = Path("report") if results.kind == "sweeps" else results.directory / "report"
    out = Path(out)
    trials = trial_rows(results, amplification)
    groups = replica_rows(results, trials)
    summary = summary_rows(results, trials)
    split, layout = figure_layout(results, **chosen)
    tradeoff_color = tradeoff_color or next(iter(layout["hue"]), None)
    figures = metric_figures(results, out / "figures", split, layout, replicas)
    figures.append(tradeoff_figure(results, trials, out / "figures", tradeoff_color, amplification))
    write_text(out / "summary.csv", to_csv(summary))
    write_text(out / "trials.csv", to_csv(trials))
    write_text(out / "trials.md", to_markdown(trials))
    write_text(out / "replicas.csv", to_csv(groups))
    write_text(out / "cycles.csv", to_csv(cycle_rows(results)))
    write_json(out / "figures.json", [asdict(f) | {"files": f.files} for f in figures])
    settings = {role: ", ".join(axes) for role, axes in layout.items()}
    settings |= {"replicas": replicas, "tradeoff_color": tradeoff_color or ""}
    if amplification:
        settings["amplification"] = ", ".join(f"{k}={v}" for k, v in amplification.items())
    write_text(out / "index.html", render_page(results, trials, groups, summary, figures, settings, answers))
    return out, results


def check_axis_names(results: SweepResults, **axes: str | None) -> None:
    """Each named axis is a config field of the trials (or `sweep`), and no axis has two roles."""
    known = results.config_keys
    problems = [
        f"--{option.replace('_', '-')}: {value!r} is not a config field of these trials; the sweep's axes are "
        f"{', '.join(results.axes) or 'none'}"
        for option, value in axes.items()
        if value is not None and value not in known
    ]
    roles = {option: value for option, value in axes.items() if value and option != "tradeoff_color"}
    if "facet" in roles and roles["facet"] == roles.get("cols"):
        roles.pop("facet")
    for value in set(roles.values()):
        named = [f"--{option}" for option, given in roles.items() if given == value]
        if len(named) > 1:
            problems.append(f"{' and '.join(named)} both name {value!r}; an axis takes one role")
    if problems:
        raise ConfigError(problems)
