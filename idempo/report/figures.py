"""Figures like the paper's, as PNG and SVG.

- Per persona x regime (unless an option puts them in the grid), one figure per metric: trait, coherence,
  branching factor and distinct-2 against the cycle, from M_init (-1) and M_seed (0) on, each a grid of
  panels (`rows` x `cols`) with a line per `hue` value (its colour) and `style` value (its line style),
  the 95% interval shaded. `pick_layout` places the axes no option placed, at most 8 lines a panel.
  Replicas are one line, their mean, or with `replicas="lines"` each replica thin beside it (the authors'
  Figure 14). Which interval is shaded where: docs/metrics.md, "Confidence intervals"; the legend names it.
- One scatter of the amplification/coherence trade-off: a point per trial, its largest trait rise over
  M_seed against its lowest coherence, both over the cycles the verdict counts; coloured by an axis, the
  marker says the verdict.

Matplotlib is used through `Figure` objects (no pyplot), so no global backend state is touched.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from idempo.layout import INIT_CYCLE
from idempo.report.results import (
    ACROSS_REPLICAS,
    WITHIN_TRIAL,
    SweepResults,
    TrialResult,
    aggregate,
    axis_value,
    lowest,
    series,
    sort_key,
)

COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
STYLES = ["-", "--", ":", "-."]
VERDICTS = {True: ("^", "amplified"), False: ("o", "not amplified"), None: ("x", "undecided")}
SHADING = {
    ACROSS_REPLICAS: "shaded: 95% CI across replicas (t, n-1 df)",
    WITHIN_TRIAL: "shaded: one trial's 95% CI over its eval prompts",
}
# (the metric in metrics.json, the file's prefix, the y label, the y range)
METRICS = (
    ("trait", "trait", "trait score (0-100)", (0, 100)),
    ("coherence", "coherence", "coherence (0-100)", (0, 100)),
    ("branching_factor", "branching", "branching factor", None),
    ("degeneration.distinct_2", "distinct2", "distinct-2", (0, 1.02)),
)
SPLIT_AXES = ("persona", "regime")  # a figure each, unless an option places them
ROLES = ("rows", "cols", "hue", "style")
MAX_LINES = 8


@dataclass
class FigureFile:
    name: str  # the first image's stem: <name>.png and <name>.svg
    title: str
    panels: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # lines drawn in each panel, replicas' own ones aside
    images: list[str] = field(default_factory=list)  # every image's stem, one per metric
    width: float = 6.4  # inches: the page shows it no narrower than 75 px an inch

    @property
    def files(self) -> list[str]:
        return [f"{stem}{suffix}" for stem in self.images or [self.name] for suffix in (".png", ".svg")]


def pick_layout(sizes: dict[str, int], max_lines: int = MAX_LINES, **chosen: str | None) -> dict[str, list[str]]:
    """Where each axis goes, given each varying axis's number of values (`sizes`) and the roles already
    chosen (`rows`, `cols`, `hue`, `style`). The paper's figures first: a column per n_sampled, a colour per
    n_seed; then the hue and style with the most values that keep hue x style <= `max_lines` lines in a
    panel; then columns; every axis left becomes rows (replicas stay averaged)."""
    placed = {role: [chosen[role]] if chosen.get(role) else [] for role in ROLES}

    def free() -> list[str]:
        return [axis for axis in sizes if all(axis not in axes for axes in placed.values())]

    if not placed["cols"] and "n_sampled" in free():
        placed["cols"] = ["n_sampled"]
    for role, limit in (("hue", len(COLOURS)), ("style", len(STYLES))):
        lines = math.prod(sizes.get(axis, 1) for axis in placed["hue"] + placed["style"])
        fits = [axis for axis in free() if sizes[axis] <= limit and lines * sizes[axis] <= max_lines]
        if not placed[role] and fits:
            placed[role] = ["n_seed" if role == "hue" and "n_seed" in fits else max(fits, key=sizes.get)]
    if not placed["cols"]:
        placed["cols"] = free()[:1]
    placed["rows"] += free()
    return placed


def figure_layout(results: SweepResults, **chosen: str | None) -> tuple[list[str], dict[str, list[str]]]:
    """The axes that split figures (persona and regime, unless chosen for a role) and every role's axes."""
    split = [axis for axis in SPLIT_AXES if axis not in chosen.values()]
    sizes = {axis: len(values) for axis, values in results.varying().items() if axis not in split}
    return split, pick_layout(sizes, **chosen)


def metric_figures(
    results: SweepResults,
    out: Path,
    split: list[str],
    layout: dict[str, list[str]],
    replicas: Literal["mean", "lines"] = "mean",
) -> list[FigureFile]:
    """One FigureFile per persona x regime, holding an image per metric that some of its trials measured."""
    colours = _palette(results.trials, layout["hue"], COLOURS)
    styles = _palette(results.trials, layout["style"], STYLES)
    sets: dict[tuple, list[TrialResult]] = {}
    for trial in results.trials:
        if trial.history:  # a trial not started yet has no config to place it by
            sets.setdefault(tuple(str(axis_value(trial, axis)) for axis in split), []).append(trial)
    figures = []
    for key, trials in sets.items():
        rows, cols = _values(trials, layout["rows"]), _values(trials, layout["cols"])
        cells = [
            (r, c, [t for t in trials if _at(t, layout["rows"]) == r and _at(t, layout["cols"]) == c])
            for r in rows
            for c in cols
        ]
        info = FigureFile(_file_name("-".join(["trait", *key])), " / ".join(key) or results.name)
        info.width = 3.8 * len(cols) + 0.8
        info.panels = [_title(layout["rows"] + layout["cols"], r + c) for r, c, _ in cells]
        for metric, prefix, ylabel, limits in METRICS:
            if not any(series(t, metric, INIT_CYCLE) for t in trials):
                continue
            figure, legend, counts = _grid(
                len(rows), len(cols), cells, info.panels, metric, layout, colours, styles, replicas
            )
            for ax in figure.axes:
                ax.set_ylim(*limits) if limits else ax.set_ylim(bottom=0)
            for ax in figure.axes[:: len(cols)]:
                ax.set_ylabel(ylabel)
            for ax in figure.axes[-len(cols) :]:
                ax.set_xlabel("cycle (-1 = M_init, 0 = M_seed)")
            columns = max(1, int(info.width / 3.4))
            figure.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=columns, fontsize="small")
            figure.set_size_inches(info.width, 2.7 * len(rows) + 1.0 + 0.2 * math.ceil(len(legend) / columns))
            figure.suptitle(f"{info.title}: {ylabel.split(' (')[0]} vs cycle")
            stem = _file_name("-".join([prefix, *key]))
            _save(figure, out, stem)
            info.images.append(stem)
            info.lines = info.lines or counts
        figures.append(info)
    return figures


def _grid(nrows, ncols, cells, titles, metric, layout, colours, styles, replicas):
    """A figure with a panel per cell, a line per hue x style value in each; the legend (an entry per line:
    the most replicas behind one of its points, and whether a trial of it is partial) and the number of
    lines in each panel."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    figure = Figure(layout="constrained")
    panels = figure.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).flatten()
    handles, replicas_of, partial, counts, intervals = {}, {}, set(), [], set()
    for ax, (_, _, members), title in zip(panels, cells, titles, strict=True):
        lines: dict[tuple, list[TrialResult]] = {}
        for trial in members:
            lines.setdefault((_at(trial, layout["hue"]), _at(trial, layout["style"])), []).append(trial)
        for line, group in lines.items():
            drawn = _draw_line(ax, group, metric, colours[line[0]], styles[line[1]], replicas)
            if drawn is not None:
                handles[line], intervals = drawn[0], intervals | drawn[1]
                replicas_of[line] = max(replicas_of.get(line, 0), len(group))
                if any(t.status == "partial" for t in group):
                    partial.add(line)
        counts.append(len(lines))
        ax.set_title(title, fontsize="medium")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    legend = {}
    for line in sorted(handles, key=lambda line: _order(line[0] + line[1])):
        pairs = list(zip(layout["hue"] + layout["style"], line[0] + line[1], strict=True))
        legend[_label(pairs, replicas_of[line], line in partial)] = handles[line]
    for kind in (ACROSS_REPLICAS, WITHIN_TRIAL):
        if kind in intervals:
            legend[SHADING[kind]] = Patch(color="black", alpha=0.15, linewidth=0)
    return figure, legend, counts


def tradeoff_figure(
    results: SweepResults,
    rows: list[dict],
    out: Path,
    colour: str | None = None,
    amplification: dict[str, Any] | None = None,
) -> FigureFile:
    """Largest trait rise over M_seed against lowest coherence, one point per trial, both over the cycles
    the amplification verdict counts (its `first_cycle` on); coloured by the axis `colour`, the marker the
    verdict. Without a coherence judge, the lowest distinct-2 stands in (and the axis says so)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    by_name = {t.name: t for t in results.trials}
    first = {t.name: t.amplification_settings(amplification).first_cycle for t in results.trials if t.config}
    measured = any(row["min_coherence"] is not None for row in rows)
    axes = [colour] if colour else []
    colours = _palette(results.trials, axes, COLOURS)
    figure = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = figure.subplots()
    verdicts, values = {}, {}
    for row in rows:
        trial = by_name[row["trial"]]
        if trial.name not in first or row["max_rise"] is None:
            continue
        low = lowest(trial, "coherence" if measured else "degeneration.distinct_2", first[trial.name])
        if low is None:
            continue
        x, y = (low if measured else low * 100), row["max_rise"]
        marker, verdict = VERDICTS[row["amplified"]]
        ax.scatter([x], [y], color=colours[_at(trial, axes)], marker=marker, alpha=0.8)
        if len(rows) <= 16:
            ax.annotate(trial.name, (x, y), fontsize="x-small", xytext=(3, 3), textcoords="offset points")
        verdicts[verdict] = Line2D([], [], color="black", marker=marker, linestyle="")
        if axes:
            values[_at(trial, axes)] = Patch(color=colours[_at(trial, axes)])
    counted = set(first.values())
    where = f"cycles >= {counted.pop()}" if len(counted) == 1 else "the cycles the verdict counts"
    ax.axhline(0, color="black", linewidth=0.8, linestyle=":")
    x_label = f"lowest coherence, {where}" if measured else f"lowest distinct-2 x 100, {where} (no coherence judge)"
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"largest trait rise over M_seed, {where}")
    title = "amplification vs coherence"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    legend = verdicts | {_label([(colour, v[0])]): values[v] for v in sorted(values, key=_order)}
    if verdicts:
        ax.legend(legend.values(), legend.keys(), fontsize="small")
    coloured = f", coloured by {colour}" if colour else ""
    info = FigureFile("tradeoff", f"Amplification vs coherence, one point per trial{coloured}", [title])
    _save(figure, out, info.name)
    return info


def _draw_line(ax, members: list[TrialResult], metric: str, colour: str, style: str, replicas: str):
    """Draw one line and its interval: the line and the kinds of interval it shaded (cycles without one
    are left unshaded); None when its trials have no value of the metric."""
    points = aggregate(members, metric)
    if not points:
        return None
    cycles = [p.cycle for p in points]
    (line,) = ax.plot(cycles, [p.mean for p in points], color=colour, linestyle=style, marker="o", markersize=3)
    low = [math.nan if p.low is None else p.low for p in points]
    high = [math.nan if p.high is None else p.high for p in points]
    ax.fill_between(cycles, low, high, color=colour, alpha=0.12, linewidth=0)
    if replicas == "lines" and len(members) > 1:
        for trial in members:
            own = series(trial, metric, INIT_CYCLE)
            ax.plot([p[0] for p in own], [p[1] for p in own], color=colour, linestyle=style, linewidth=0.7, alpha=0.5)
    return line, {p.interval for p in points if p.interval}


def _label(pairs: list[tuple[str, Any]], replicas: int = 1, partial: bool = False) -> str:
    text = ", ".join(f"{short(axis)}={value}" for axis, value in pairs) or "all"
    text += f" ({replicas} replicas)" if replicas > 1 else ""
    return text + (" [partial]" if partial else "")


def _title(axes: list[str], values: tuple) -> str:
    return ", ".join(f"{short(axis)} = {value}" for axis, value in zip(axes, values, strict=True)) or "all trials"


def short(axis: str) -> str:
    """An axis as labels show it: its last dotted part (training.schedule -> schedule)."""
    return axis.split(".")[-1]


def _at(trial: TrialResult, axes: list[str]) -> tuple:
    return tuple(axis_value(trial, axis) for axis in axes)


def _order(values: tuple) -> tuple:
    return tuple(sort_key(value) for value in values)


def _values(trials: list[TrialResult], axes: list[str]) -> list[tuple]:
    """The value tuples of `axes` that these trials hold, in their natural order."""
    found: list[tuple] = []
    for trial in trials:
        if _at(trial, axes) not in found:
            found.append(_at(trial, axes))
    return sorted(found, key=_order)


def _palette(trials: list[TrialResult], axes: list[str], choices: list[str]) -> dict[tuple, str]:
    """The same colour (or line style) for a value in every figure of the report."""
    return {values: choices[i % len(choices)] for i, values in enumerate(_values(trials, axes))}


def _save(figure, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for suffix, options in ((".png", {"dpi": 110}), (".svg", {})):
        tmp = out / f".{name}{suffix}.tmp"
        figure.savefig(tmp, format=suffix[1:], **options)
        tmp.replace(out / f"{name}{suffix}")


def _file_name(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text)
