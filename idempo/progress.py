"""What a running trial tells the person watching: a progress bar per phase, a line per cycle under a header."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from tqdm import tqdm


class Reporter:
    """Prints to the terminal; `Reporter(enabled=False)` keeps a library caller's output clean."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._header_shown = False  # the column names come once, before the first cycle line

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

    def cycle(self, metrics: dict, resumed: bool = False, shared: bool = False) -> None:
        if not self._header_shown:
            self.note(HEADER)
            self._header_shown = True
        self.note(summary_line(metrics, "earlier" if resumed else "shared" if shared else None))


# A cycle line's columns: header, width. Right-aligned but the first; 93 characters in all, so that a sweep's
# driver can put a trial's number before it and stay inside 100 columns.
COLUMNS = (
    ("gen", 8),  # the generation: init, 000-seed, 001, ...
    ("trait", 5),
    ("95% CI", 13),
    ("coher", 6),
    ("BF", 6),
    ("dist2", 6),
    ("rep4", 6),
    ("words", 6),
    ("loss", 11),  # first -> final training loss
    ("rows", 9),  # rows trained on (preference regimes: pairs / prompts)
    ("time", 7),  # the stage's seconds; 'earlier': done by an earlier run, 'shared': run by another trial
)


def _line(cells: list[str]) -> str:
    return " ".join(
        cell.ljust(width) if i == 0 else cell.rjust(width)
        for i, (cell, (_, width)) in enumerate(zip(cells, COLUMNS, strict=True))
    )


HEADER = _line([name for name, _ in COLUMNS])


def summary_line(metrics: dict, note: str | None = None) -> str:
    """One stage's metrics.json in a line of `COLUMNS` (`note` replaces the time: where the stage came from)."""
    trait, degeneration = metrics["trait"], metrics["degeneration"]
    low, high = trait["ci95"]
    branching = metrics.get("branching_factor")
    train, data = metrics.get("train") or {}, metrics.get("data") or {}
    rows = f"{data['pairs']}/{data['prompts']}" if "pairs" in data else str(data.get("n", "-"))
    loss = (
        f"{_fit(train['first_loss'], 5).strip()}>{_fit(train['final_loss'], 5).strip()}"
        if "first_loss" in train
        else "-"
    )
    time = note or _fit((metrics.get("timing_s") or {}).get("total"), 7, 0, "s")
    return _line(
        [
            metrics["generation"],
            _fit(trait["mean"], 5, 1),
            f"[{_fit(low, 5, 1)},{_fit(high, 5, 1)}]",
            _fit((metrics.get("coherence") or {}).get("mean"), 6, 1) if metrics.get("coherence") else "-",
            _fit(branching["mean"], 6) if branching else "-",
            _fit(degeneration["distinct_2"], 6),
            _fit(degeneration["repeated_4gram_rate"], 6),
            _fit(degeneration["mean_words"], 6, 1),
            loss,
            rows,
            time,
        ]
    )


def _fit(value, width: int, decimals: int = 2, unit: str = "") -> str:
    """A number right-aligned in `width` characters, with fewer decimals where it would not fit."""
    if value is None:
        return "n/a".rjust(width)
    for places in range(decimals, -1, -1):
        text = f"{value:.{places}f}{unit}"
        if len(text) <= width:
            return text.rjust(width)
    return f"{value:.0e}".rjust(width)


def quiet_transformers() -> None:
    """Our phases have their own progress bars; the library's per-file bars only add noise."""
    from transformers.utils import logging

    logging.disable_progress_bar()
