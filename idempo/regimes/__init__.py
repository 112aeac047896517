"""Regimes: what each generation trains on and by which loss, one module per family, chosen by
`config.regime` from `idempo.registry.REGIMES` (docs/architecture.md says how to add one)."""

from idempo.regimes.base import Regime, StageContext
from idempo.registry import REGIMES


def load_regime(name: str) -> Regime:
    return REGIMES.load(name)()
