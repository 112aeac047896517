"""index.html: the whole report on one page that opens from disk, with no network.

A summary per axis value first, then the figures, then the tables (the long ones folded, every column
name short, the full one in its title), then a few sampled answers of one replica per configuration.
"""

from __future__ import annotations

from datetime import datetime, timezone
from html import escape

from idempo.report.answers import MAX_CHARS, representatives, sampled_answers
from idempo.report.figures import FigureFile, short
from idempo.report.results import REPLICA_AXES, SweepResults
from idempo.report.tables import cell

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; margin: 0.3em 0; } h2 { font-size: 1.15em; margin: 1.2em 0 0.4em; }
p { margin: 0.4em 0; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.3em 0; }
th, td { border: 1px solid #ccc; padding: 1px 6px; text-align: right; }
th, td { white-space: nowrap; } th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
td.text { text-align: left; } tr.group td { border-top: 2px solid #999; }
tr.partial td { background: #fff6dd; } tr.amplified td { background: #fde2e1; }
.figures { display: grid; gap: 0.5em; margin-bottom: 1em; }
figure { margin: 0; } figure img { width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.8em; color: #555; }
.scroll { overflow: auto; max-height: 80vh; }
.note { background: #fff6dd; border: 1px solid #e8d48b; padding: 0.2em 1em; margin: 0.4em 0; }
.side { display: flex; gap: 1.5em; align-items: flex-start; } .side p { max-width: 34em; font-size: 0.9em; }
.small { font-size: 0.85em; }
details { margin: 0.3em 0; } summary { cursor: pointer; }
table.answers th { text-align: left; } table.answers td { white-space: normal; max-width: 20em; vertical-align: top; }
table.answers td:last-child { white-space: pre-wrap; max-width: 60em; text-align: left; }
"""

# a column of the report's tables: its name on the page, and what it holds
HEADERS = {
    "median_final_minus_seed": ("median Δ trait", "median over the trials of (last completed cycle - M_seed)"),
    "lowest_coherence": ("lowest coherence", "the coherence judge's lowest mean, cycles >= 0"),
    "lowest_bf": ("lowest BF", "lowest branching factor, cycles >= 0"),
    "lowest_distinct_2": ("lowest distinct-2", "lowest distinct-2, cycles >= 0"),
    "amplified": ("ampl.", "amplified: k of the n trials with a verdict, or this trial's verdict"),
    "seed_trait": ("M_seed", "trait of M_seed (cycle 0)"),
    "peak_trait": ("peak", "highest trait after M_init"),
    "final_trait": ("final", "trait at the last completed cycle"),
    "max_rise": ("max rise", "largest trait rise over M_seed at the cycles the verdict counts"),
    "min_coherence": ("min coh.", "lowest coherence, cycles >= 0"),
    "min_distinct_2": ("min d-2", "lowest distinct-2, cycles >= 0"),
    "bf_slope": ("BF slope", "least-squares slope of the branching factor per cycle"),
    "first_amplified_cycle": ("from", "first cycle of the amplified run"),
    "min_p_value": ("min p", "smallest one-sided p-value of a rise at the counted cycles"),
    "m_seed": ("M_seed from", "where the trial's M_seed was trained"),
    "note": ("note", "why the stopper ended the trial, or why its verdict is still open"),
    "amplification_rule": ("rule", "the rule that gave the verdict"),
    "replicas": ("n", "replicas (trials that differ only in seed)"),
    "complete": ("done", "replicas complete or stopped"),
    "final_trait_ci95": ("95% CI", "of the final trait, across replicas (t, n-1 df)"),
    "final_minus_seed": ("final - M_seed", "final trait minus M_seed's, mean across replicas"),
    "final_minus_seed_ci95": ("95% CI", "of final - M_seed, across replicas"),
    "bf_final_minus_seed": ("BF final - M_seed", "branching factor, final minus M_seed's"),
    "bf_final_minus_seed_ci95": ("95% CI", "of BF final - M_seed, across replicas"),
}
TRIAL_COLUMNS = [
    "status", "cycles", "seed_trait", "peak_trait", "final_trait", "max_rise", "min_coherence", "min_distinct_2",
    "bf_slope", "amplified", "first_amplified_cycle", "min_p_value", "m_seed", "note",
]  # fmt: skip
LONG = 32  # characters of a cell shown; the rest is in its title
FOLDED = 20  # tables with more rows start folded


def render_page(
    results: SweepResults,
    trials: list[dict],
    replicas: list[dict],
    summary: list[dict],
    figures: list[FigureFile],
    settings: dict[str, str],
    answers: int = 3,
) -> str:
    partial = [row["trial"] for row in trials if row["status"] in ("partial", "not started")]
    statuses = [row["status"] for row in trials]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
    varying = results.varying()
    replica_axes = [a for a in results.axes if a in REPLICA_AXES]
    kind = {"sweep": "Sweep", "trial": "Trial", "sweeps": "Sweeps"}[results.kind]
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>idempo report: {escape(results.name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{kind} <code>{escape(results.name)}</code></h1>",
        f"<p>{len(trials)} trials ({counts}); axes: "
        + (", ".join(f"<code>{escape(a)}</code> ({len(v)})" for a, v in varying.items()) or "none")
        + (f"; replicas by <code>{'</code>, <code>'.join(replica_axes)}</code>" if replica_axes else "")
        + ". Read from "
        + ", ".join(f"<code>{escape(str(path))}</code>" for path in results.sources)
        + " at "
        + datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        + ".</p>",
    ]
    if partial:
        parts.append(
            f'<details class="note"><summary>{len(partial)} trial(s) are partial (still running, or interrupted); '
            "their rows and lines show the cycles completed so far.</summary>"
            + ", ".join(f"<code>{escape(name)}</code>" for name in partial)
            + "</details>"
        )
    rules = list(dict.fromkeys(row["amplification_rule"] for row in trials))
    parts += [
        '<h2 id="summary">Summary</h2><div class="side">',
        _table(summary, row_class=lambda row: "group" if row["value"] == varying.get(row["axis"], [None])[0] else ""),
        "<div><p>Amplified by the rule "
        + " / ".join(f"<code>{escape(rule)}</code>" for rule in rules)
        + ".</p><p>ampl.: k/n, k amplified of the n trials with a verdict.</p><p>Δ trait: the last completed "
        "cycle's trait minus M_seed's (cycle 0), median over the trials.</p><p>Lowest coherence: the coherence "
        'judge\'s mean, over cycles >= 0 (without a judge: "no judge", and the lowest branching factor and '
        "distinct-2).</p></div></div>",
        '<h2 id="figures">Figures</h2>',
        f'<p class="small">{escape(_figure_settings(settings))}</p>',
    ]
    for figure in figures:
        minimum = round(75 * figure.width)  # px: images sit side by side where they fit at this width
        parts.append(
            f'<div class="figures" title="{escape(figure.title)}" style="grid-template-columns: '
            f'repeat(auto-fill, minmax(min(100%, {minimum}px), 1fr))">'
        )
        for stem in figure.images or [figure.name]:
            parts.append(
                f'<figure><img src="figures/{escape(stem)}.svg" alt="{escape(stem)}">'
                f'<figcaption><a href="figures/{escape(stem)}.png">PNG</a>, '
                f'<a href="figures/{escape(stem)}.svg">SVG</a></figcaption></figure>'
            )
        parts.append("</div>")
    if len(replicas) > 1 or any(row["replicas"] > 1 for row in replicas):
        parts.append('<h2 id="configurations">Configurations (replicas averaged)</h2>')
        constant = [a for a in results.axes if a not in varying]
        configurations = [{k: v for k, v in row.items() if k not in constant} for row in replicas]
        parts.append(_folded(f"{len(replicas)} configurations", _table(configurations), len(replicas)))
    parts.append('<h2 id="trials">Trials</h2>')
    columns = ["trial", *TRIAL_COLUMNS, *(["amplification_rule"] if len(rules) > 1 else [])]
    if any(row["min_coherence"] is not None for row in trials):
        columns.remove("min_distinct_2")
    named = [a for a in results.axes if a in varying or a in REPLICA_AXES]
    shown = [{**row, "trial": (_name(named, row), row["trial"]), "note": _note(row)} for row in trials]
    header = {"trial": ("trial", " · ".join(named) + " (each row's full name in its title)")}
    parts.append(_folded(f"{len(trials)} trials", _table(shown, columns, _row_class, header), len(trials)))
    if answers:
        parts += _answers(results, named, answers)
    parts.append(
        '<h2>Data</h2><p><a href="summary.csv">summary.csv</a>, <a href="trials.csv">trials.csv</a>, '
        '<a href="trials.md">trials.md</a>, <a href="replicas.csv">replicas.csv</a>, <a href="cycles.csv">'
        'cycles.csv</a> (every metric of every completed cycle), <a href="figures.json">figures.json</a>.</p>'
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _answers(results: SweepResults, named: list[str], per_cycle: int) -> list[str]:
    chosen = representatives(results)
    parts = [
        '<h2 id="answers">Sampled answers</h2>',
        f"<p>{per_cycle} answers per generation, with their scores, from one replica of each configuration "
        f"({len(chosen)} of {len(results.trials)} trials; <code>--answers N</code> sets how many per generation). "
        f"Answers are cut at {MAX_CHARS} characters; every answer is in each cycle's eval.jsonl.</p>",
    ]
    for trial in chosen:
        rows = sampled_answers(trial, per_cycle)
        body = "".join(
            f"<tr><td>{row['cycle']}</td><td>{cell(row['trait'])}</td><td>{cell(row['coherence'])}</td>"
            f'<td class="text">{escape(row["prompt"])}</td><td>{escape(row["answer"])}</td></tr>'
            for row in rows
        )
        table = (
            '<table class="answers"><thead><tr><th>cycle</th><th>trait</th><th>coherence</th><th>prompt</th>'
            f"<th>answer</th></tr></thead><tbody>{body}</tbody></table>"
        )
        label = _name(named, {"trial": trial.name, **trial.axes}, "=")
        parts.append(f'<details><summary title="{escape(trial.name)}">{escape(label)}</summary>{table}</details>')
    return parts


def _figure_settings(settings: dict[str, str]) -> str:
    roles = {"rows": "panel rows", "cols": "columns", "hue": "colour", "style": "line style"}
    text = "; ".join(f"{words} {settings[role]}" for role, words in roles.items() if settings.get(role)) or "one panel"
    text += "; replicas: " + ("mean, 95% CI" if settings["replicas"] == "mean" else "mean and each one's line")
    text += f"; trade-off colour {settings.get('tradeoff_color') or 'none'}"
    if settings.get("amplification"):
        text += f"; amplification: {settings['amplification']}"
    return text + " (--rows, --cols, --hue, --style, --replicas, --tradeoff-color)"


def _name(axes: list[str], row: dict, between: str = "") -> str:
    """A trial by its values of `axes`, with their names `between` given (its full name goes in a title)."""
    if not axes:
        return row["trial"]
    return " · ".join(f"{short(a)}{between}{row.get(a)}" if between else cell(row.get(a)) for a in axes)


def _note(row: dict) -> str | None:
    if row["stop_reason"]:
        return f"stopped: {row['stop_reason']}"
    return row["undecided_because"] and f"undecided: {row['undecided_because']}"


def _row_class(row: dict) -> str:
    if row.get("amplified") is True:
        return "amplified"
    return "partial" if row.get("status") in ("partial", "not started") else ""


def _folded(summary: str, table: str, rows: int) -> str:
    return f"<details{'' if rows > FOLDED else ' open'}><summary>{escape(summary)}</summary>{table}</details>"


def _table(rows: list[dict], columns: list[str] | None = None, row_class=lambda row: "", headers=None) -> str:
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    headers = HEADERS | (headers or {})
    head = "".join(
        f'<th title="{escape(headers.get(c, (c, c))[1])}">{escape(headers.get(c, (short(c),))[0])}</th>'
        for c in columns
    )
    body = []
    for row in rows:
        css = row_class(row)
        cells = "".join(_cell(row.get(c)) for c in columns)
        body.append(f'<tr class="{css}">{cells}</tr>' if css else f"<tr>{cells}</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


def _cell(value) -> str:
    """A cell; a (text, title) pair shows the text; long text is cut, whole in its title."""
    text, title = value if isinstance(value, tuple) else (cell(value), cell(value))
    if len(text) > LONG:
        text = text[: LONG - 1] + "…"
    kind = ' class="text"' if isinstance(value, str | tuple) else ""
    return (
        f'<td{kind} title="{escape(title)}">{escape(text)}</td>' if title != text else f"<td{kind}>{escape(text)}</td>"
    )
