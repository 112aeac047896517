"""Measuring each generation: judges, branching factor, degeneration signals, confidence intervals."""

from idempo.registry import JUDGES
