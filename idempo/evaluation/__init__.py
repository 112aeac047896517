"""Measuring each generation: judges, branching factor, degeneration signals, confidence intervals."""

from idempo.registry import Registry

JUDGES = Registry(
    "judge",
    {
        "marker": "idempo.evaluation.markers:MarkerJudge",
        "openai": "idempo.evaluation.openai_judge:OpenAIJudge",
        "hf": "idempo.evaluation.hf_judge:HFJudge",
    },
)

__all__ = ["JUDGES"]
