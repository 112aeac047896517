"""Figures like the paper's, as PNG and SVG.

- One trait-vs-cycle figure per persona x regime: a panel per value of `facet` (default n_sampled), a
  line per value of `hue` (default n_seed) and of any other varying axis; the trait solid with its 95%
  interval shaded, coherence dashed in the same colour, M_seed's trait as a dotted baseline. Replicas
  are one line, their mean, or with `replicas="lines"` each replica thin beside it (the authors' Figure
  14). Which interval is shaded where: docs/metrics.md, "Confidence intervals"; the legend names it.
- One scatter of the amplification/coherence trade-off: a point per trial, its largest rise of the
  trait over M_seed against its lowest coherence after the seed.

Matplotlib is used through `Figure` objects (no pyplot), so no global backend state is touched.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from idempo.layout import SEED_CYCLE
from idempo.report.results import (
    ACROSS_REPLICAS,
    REPLICA_AXES,
    WITHIN_TRIAL,
    SweepResults,
    TrialResult,
    aggregate,
    series,
)

COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
AMPLIFIED_COLOURS = {True: "#d62728", False: "#1f77b4", None: "#7f7f7f"}
SHADING = {
    ACROSS_REPLICAS: "shaded: 95% CI across replicas (t, n-1 df)",
    WITHIN_TRIAL: "shaded: one trial's 95% CI over its eval prompts",
}


@dataclass
class FigureFile:
    name: str  # file stem: <name>.png and <name>.svg
    title: str
    panels: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[str]:
        return [f"{self.name}.png", f"{self.name}.svg"]


def trait_figures(
    results: SweepResults,
    out: Path,
    facet: str = "n_sampled",
    hue: str = "n_seed",
    replicas: Literal["mean", "lines"] = "mean",
) -> list[FigureFile]:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    figures = []
    by_setting: dict[tuple[str, str], list[TrialResult]] = {}
    for trial in results.trials:
        if trial.history:  # a trial not started yet has no config to place it by
            by_setting.setdefault((trial.persona, trial.regime), []).append(trial)
    line_axes = [hue] + [a for a in results.axes if a not in (facet, hue, *REPLICA_AXES)]
    for (persona, regime), trials in by_setting.items():
        facet_values = _ordered({_key(t.value(facet)) for t in trials}, trials, facet)
        lines: dict[tuple, list[TrialResult]] = {}
        for trial in trials:
            lines.setdefault(tuple((a, trial.value(a)) for a in line_axes), []).append(trial)
        colours = {line: COLOURS[i % len(COLOURS)] for i, line in enumerate(sorted(lines, key=_sortable))}

        width = 4.6 * len(facet_values) + 1.4
        figure = Figure(figsize=(width, 5.0), layout="constrained")
        panels = figure.subplots(1, len(facet_values), sharey=True, squeeze=False)[0]
        info = FigureFile(_file_name(f"trait-{persona}-{regime}"), f"{persona} / {regime}: trait vs cycle")
        coherence_drawn, intervals = False, set()
        for ax, value in zip(panels, facet_values, strict=True):
            for line, members in sorted(lines.items(), key=lambda item: _sortable(item[0])):
                members = [t for t in members if _key(t.value(facet)) == value]
                if members:
                    drawn = _draw_line(ax, members, _label(line, members), colours[line], replicas)
                    coherence_drawn |= drawn["coherence"]
                    intervals |= drawn["intervals"]
            title = f"{facet} = {value}"
            ax.set_title(title)
            ax.set_xlabel("cycle (0 = M_seed)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            info.panels.append(title)
        panels[0].set_ylabel("score (0-100)")
        legend = {}  # every panel's lines, once each, then what the line styles mean
        for ax in panels:
            legend.update({label: handle for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)})
        styles = [("trait", "-"), ("M_seed's trait", ":")]
        styles += [("coherence", "--")] if coherence_drawn else []
        for label, style in styles:
            legend[label] = Line2D([], [], color="black", linestyle=style)
        for kind in (ACROSS_REPLICAS, WITHIN_TRIAL):
            if kind in intervals:
                legend[SHADING[kind]] = Patch(color="black", alpha=0.15, linewidth=0)
        figure.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=3, fontsize="small")
        figure.suptitle(info.title)
        _save(figure, out, info.name)
        figures.append(info)
    return figures


def tradeoff_figure(results: SweepResults, rows: list[dict], out: Path) -> FigureFile:
    """Largest trait rise over M_seed against lowest coherence, one point per trial, coloured by verdict.
    Without a coherence judge, the lowest distinct-2 stands in (and the axis says so)."""
    from matplotlib.figure import Figure

    measured = any(row["min_coherence"] is not None for row in rows)
    figure = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = figure.subplots()
    by_name = {t.name: t for t in results.trials}
    for verdict, label in ((True, "amplified"), (False, "not amplified"), (None, "undecided")):
        points = [
            (x, y, row["trial"])
            for row in rows
            if row["amplified"] is verdict
            for x, y in [(_coherence(by_name[row["trial"]], row, measured), _largest_rise(by_name[row["trial"]]))]
            if x is not None and y is not None
        ]
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points], c=AMPLIFIED_COLOURS[verdict], label=label)
            if len(rows) <= 16:
                for x, y, name in points:
                    ax.annotate(name, (x, y), fontsize="x-small", xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="black", linewidth=0.8, linestyle=":")
    ax.set_xlabel("lowest coherence after the seed" if measured else "lowest distinct-2 x 100 (no coherence judge)")
    ax.set_ylabel("largest trait rise over M_seed after the seed (points)")
    title = "amplification vs coherence"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.collections:
        ax.legend(fontsize="small")
    info = FigureFile("tradeoff", "Amplification vs coherence, one point per trial", [title])
    _save(figure, out, info.name)
    return info


def _draw_line(ax, members: list[TrialResult], label: str, colour: str, replicas: str) -> dict:
    """Draw one line's trait, interval, coherence and baseline; says whether it had coherence to draw and
    which kinds of interval it shaded (cycles without an interval are left unshaded)."""
    trait = aggregate(members, "trait")
    if not trait:
        return {"coherence": False, "intervals": set()}
    cycles = [p.cycle for p in trait]
    ax.plot(cycles, [p.mean for p in trait], color=colour, marker="o", markersize=3, linewidth=1.8, label=label)
    low = [math.nan if p.low is None else p.low for p in trait]
    high = [math.nan if p.high is None else p.high for p in trait]
    ax.fill_between(cycles, low, high, color=colour, alpha=0.15, linewidth=0)
    if replicas == "lines" and len(members) > 1:
        for trial in members:
            own = series(trial, "trait")
            ax.plot([p[0] for p in own], [p[1] for p in own], color=colour, linewidth=0.7, alpha=0.5)
    coherence = aggregate(members, "coherence")
    if coherence:
        ax.plot([p.cycle for p in coherence], [p.mean for p in coherence], color=colour, linestyle="--", linewidth=1.2)
    seed = [p.mean for p in trait if p.cycle == SEED_CYCLE]
    if seed:
        ax.axhline(seed[0], color=colour, linestyle=":", linewidth=1.0)
    return {"coherence": bool(coherence), "intervals": {p.interval for p in trait if p.interval}}


def _largest_rise(trial: TrialResult) -> float | None:
    trait = series(trial, "trait")
    seed = [mean for cycle, mean, _, _ in trait if cycle == SEED_CYCLE]
    later = [mean for cycle, mean, _, _ in trait if cycle > SEED_CYCLE]
    return max(later) - seed[0] if seed and later else None


def _coherence(trial: TrialResult, row: dict, measured: bool) -> float | None:
    if measured:
        return row["min_coherence"]
    values = [
        m["degeneration"]["distinct_2"] * 100
        for m in trial.history
        if m["cycle"] > SEED_CYCLE and (m.get("degeneration") or {}).get("distinct_2") is not None
    ]
    return min(values, default=None)


def _label(line: tuple, members: list[TrialResult]) -> str:
    text = ", ".join(f"{axis.split('.')[-1]}={value}" for axis, value in line)
    if len(members) > 1:
        text += f" ({len(members)} replicas)"
    if any(t.status == "partial" for t in members):
        text += " [partial]"
    return text


def _save(figure, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for suffix, options in ((".png", {"dpi": 110}), (".svg", {})):
        tmp = out / f".{name}{suffix}.tmp"
        figure.savefig(tmp, format=suffix[1:], **options)
        tmp.replace(out / f"{name}{suffix}")


def _key(value) -> str:
    return str(value)


def _ordered(values: set[str], trials: list[TrialResult], axis: str) -> list[str]:
    """Facet values in their natural order (numbers numerically)."""
    raw = {_key(t.value(axis)): t.value(axis) for t in trials}
    return sorted(values, key=lambda v: _sortable(((axis, raw[v]),)))


def _sortable(line: tuple) -> tuple:
    return tuple((0, value, "") if isinstance(value, int | float) else (1, 0, str(value)) for _, value in line)


def _file_name(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text)
