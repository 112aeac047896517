"""A W&B report for a sweep: its group's runs, grouped by the sweep's axes, trait and coherence panels.

Built with the W&B reports API (`wandb_workspaces.reports.v2`). Saving needs W&B online (an API key);
offline, the report objects are still built, so the specification is checked, and `publish` says what
it would create. Runs are grouped by the config fields of the sweep's axes (replicas' seeds aside), as
the runs' nested config holds them: `config.evaluation.amplification.threshold`.
"""

from __future__ import annotations

from typing import Any

from idempo.report.results import REPLICA_AXES, SweepResults
from idempo.tracking import wandb_mode

PANELS = (
    ("Trait score", "trait/mean"),
    ("Coherence", "coherence/mean"),
    ("Branching factor", "branching_factor/mean"),
    ("Distinct-2", "degeneration/distinct_2"),
)


def report_plan(results: SweepResults, project: str | None = None, entity: str | None = None) -> dict[str, Any]:
    """What the report holds: the sweep's W&B project and group, the grouping, the panels."""
    settings = results.wandb or {}
    return {
        "title": f"idempo sweep {results.name}",
        "description": f"Runs of the sweep {results.name} (W&B group), replicas averaged; x-axis: cycle.",
        "project": project or settings.get("project") or "idempo",
        "entity": entity or settings.get("entity"),
        "filter": f"Metric('Group') = '{results.name}'",
        "groupby": [f"config.{axis}" for axis in results.axes if axis not in REPLICA_AXES],
        "panels": [{"title": title, "x": "cycle", "y": metric} for title, metric in PANELS],
    }


def build_report(plan: dict[str, Any]):
    import wandb_workspaces.reports.v2 as wr

    entity = plan["entity"] or "(default entity)"  # a placeholder only where nothing is saved
    runset = wr.Runset(
        entity=entity, project=plan["project"], name=plan["title"], filters=plan["filter"], groupby=plan["groupby"]
    )
    panels = [
        wr.LinePlot(title=p["title"], x=p["x"], y=[p["y"]], groupby_aggfunc="mean", groupby_rangefunc="stderr")
        for p in plan["panels"]
    ]
    return wr.Report(
        project=plan["project"],
        entity=entity,
        title=plan["title"],
        description=plan["description"],
        blocks=[wr.PanelGrid(runsets=[runset], panels=panels)],
    )


def publish(results: SweepResults, mode: str = "auto", project: str | None = None, entity: str | None = None) -> str:
    """Save the report when W&B is online; otherwise describe it. Returns a line for the user."""
    plan = report_plan(results, project, entity)
    if wandb_mode(mode) != "online":
        build_report(plan)  # the specification is checked against the installed API even offline
        panels = ", ".join(p["y"] for p in plan["panels"])
        return (
            f"W&B is offline (no WANDB_API_KEY, no `wandb login`): would create the report '{plan['title']}' "
            f"in project {plan['project']} of entity {plan['entity'] or '(your default)'}, "
            f"runs where {plan['filter']}, grouped by {', '.join(plan['groupby']) or 'nothing'}, "
            f"line panels over cycle: {panels}. "
            "Sync the offline runs first (`wandb sync`), then run this again after `wandb login`."
        )
    if plan["entity"] is None:
        import wandb

        plan["entity"] = wandb.Api().default_entity
    report = build_report(plan)
    report.save()
    return f"W&B report: {report.url}"
