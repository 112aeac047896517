"""Measuring each generation: trait score, degeneration signals, confidence intervals."""

from idempo.registry import Registry

JUDGES = Registry("judge", {"marker": "idempo.evaluation.markers:MarkerJudge"})

__all__ = ["JUDGES"]
