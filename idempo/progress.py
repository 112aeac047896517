"""What a running trial tells the person watching: a progress bar per phase, a line per cycle."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from tqdm import tqdm


class Reporter:
    """Prints to the terminal; `Reporter(enabled=False)` keeps a library caller's output clean."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    @contextmanager
    def phase(self, label: str, total: int, unit: str):
        bar = tqdm(
            total=total,
            desc=label,
            unit=unit,
            leave=False,
            file=sys.stderr,
            disable=not self.enabled,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        try:
            yield bar
        finally:
            bar.close()

    def note(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stdout)

    def cycle(self, metrics: dict, resumed: bool = False) -> None:
        self.note(summary_line(metrics) + ("  (done earlier)" if resumed else ""))


def summary_line(metrics: dict) -> str:
    trait = metrics["trait"]
    degeneration = metrics["degeneration"]
    parts = [
        f"{metrics['generation']:>8}",
        f"trait {_num(trait['mean'])} [{_num(trait['ci95'][0])}, {_num(trait['ci95'][1])}] ({trait['judge']})",
    ]
    if metrics.get("coherence"):
        parts.append(f"coherence {_num(metrics['coherence']['mean'])}")
    if metrics.get("branching_factor"):
        parts.append(
            f"BF {metrics['branching_factor']['mean']:.2f}" if metrics["branching_factor"]["mean"] else "BF n/a"
        )
    parts += [
        f"words {degeneration['mean_words']:.1f}",
        f"distinct-2 {degeneration['distinct_2']:.2f}",
        f"rep-4 {degeneration['repeated_4gram_rate']:.2f}",
    ]
    train = metrics.get("train") or {}
    if "first_loss" in train:
        parts.append(f"loss {train['first_loss']:.2f}->{train['final_loss']:.2f}")
    if "pairs" in (metrics.get("data") or {}):
        parts.append(f"pairs {metrics['data']['pairs']}/{metrics['data']['prompts']}")
    timing = metrics.get("timing_s") or {}
    if timing:
        parts.append("(" + ", ".join(f"{k} {v:.1f}s" for k, v in timing.items()) + ")")
    return "  ".join(parts)


def _num(value) -> str:
    return "  n/a" if value is None else f"{value:5.1f}"


def quiet_transformers() -> None:
    """Our phases have their own progress bars; the library's per-file bars only add noise."""
    from transformers.utils import logging

    logging.disable_progress_bar()
