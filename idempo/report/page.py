"""index.html: the whole report on one page that opens from disk, with no network."""

from __future__ import annotations

from datetime import datetime, timezone
from html import escape

from idempo.report.figures import FigureFile
from idempo.report.results import SweepResults
from idempo.report.tables import cell

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
tr.partial td { background: #fff6dd; } tr.amplified td { background: #fde2e1; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
.scroll { overflow-x: auto; }
.note { background: #fff6dd; border: 1px solid #e8d48b; padding: 0.5em 1em; }
"""


def render_page(
    results: SweepResults,
    trials: list[dict],
    replicas: list[dict],
    figures: list[FigureFile],
    settings: dict[str, str],
) -> str:
    partial = [row["trial"] for row in trials if row["status"] in ("partial", "not started")]
    amplified = sum(row["amplified"] is True for row in trials)
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>idempo report: {escape(results.name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Sweep <code>{escape(results.name)}</code></h1>",
        f"<p>{len(trials)} trials, {amplified} amplified; axes: "
        + (", ".join(f"<code>{escape(a)}</code>" for a in results.axes) or "none")
        + f". Read from <code>{escape(str(results.directory))}</code> at "
        + datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        + ".</p>",
        "<p>" + "; ".join(f"{escape(k)}: {escape(v)}" for k, v in settings.items()) + "</p>",
    ]
    if partial:
        parts.append(
            f'<p class="note">{len(partial)} trial(s) are partial (still running, or interrupted): '
            + ", ".join(f"<code>{escape(name)}</code>" for name in partial)
            + ". Their rows and lines show the cycles completed so far.</p>"
        )
    parts.append("<h2>Trials</h2>")
    rules = list(dict.fromkeys(row["amplification_rule"] for row in trials))
    parts.append(
        "<p>Amplified by the rule "
        + " / ".join(f"<code>{escape(rule)}</code>" for rule in rules)
        + '; "undecided_because" says why a verdict is still open.</p>'
    )
    shown = (
        trials if len(rules) > 1 else [{k: v for k, v in row.items() if k != "amplification_rule"} for row in trials]
    )
    parts.append(_table(shown, row_class=_row_class))
    if any(row["replicas"] > 1 for row in replicas):
        parts.append("<h2>Replicas (trials that differ only in seed)</h2>")
        parts.append(_table(replicas))
    parts.append("<h2>Figures</h2>")
    for figure in figures:
        parts.append(
            f'<figure><img src="figures/{escape(figure.files[1])}" alt="{escape(figure.title)}">'
            f"<figcaption>{escape(figure.title)} "
            f'(<a href="figures/{escape(figure.files[0])}">PNG</a>, '
            f'<a href="figures/{escape(figure.files[1])}">SVG</a>)</figcaption></figure>'
        )
    parts.append(
        '<h2>Data</h2><p><a href="trials.csv">trials.csv</a>, <a href="trials.md">trials.md</a>, '
        '<a href="replicas.csv">replicas.csv</a>, <a href="cycles.csv">cycles.csv</a> '
        "(every metric of every completed cycle).</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _row_class(row: dict) -> str:
    if row.get("amplified") is True:
        return "amplified"
    return "partial" if row.get("status") in ("partial", "not started") else ""


def _table(rows: list[dict], row_class=lambda row: "") -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        css = row_class(row)
        cells = "".join(f"<td>{escape(cell(row.get(c)))}</td>" for c in columns)
        body.append(f'<tr class="{css}">{cells}</tr>' if css else f"<tr>{cells}</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="scroll">{table}</div>'
