"""Engines and regimes picked by name from config: a name maps to 'module:attribute', imported only when used.

Lazy imports keep config validation light (this module imports nothing of idempo) and let an engine whose
package is missing (vLLM on a laptop) fail only when it is chosen, with a message that says what to install.
`register` adds an entry from outside the package (a regime of one's own, in a plugin or a test). A
regime's entry also says what config validation and the sweep's shared stages must know before it is
imported: `defaults` (settings of the paper it implements, under the config's own), `documents` (trains on
documents, not chats), `seed_regime` (whose loss trains M_seed; itself by default) and `seed_reads` (the
settings beyond the training section that its seed stage reads, by section: `beta`, `preference` fields).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


class Registry(Mapping[str, str]):
    def __init__(self, kind: str, entries: dict[str, str], info: dict[str, dict[str, Any]] | None = None):
        self.kind = kind
        self._entries = dict(entries)
        self._info = dict(info or {})

    def __getitem__(self, name: str) -> str:
        return self._entries[name]

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def register(self, name: str, path: str, **info: Any) -> None:
        """Add (or replace) `name` -> 'module:attribute', with what must be known of it before it is imported."""
        self._entries[name] = path
        self._info[name] = info

    def info(self, name: str) -> dict[str, Any]:
        """What is known of an entry without importing it (a regime's config defaults)."""
        return self._info.get(name, {})

    def load(self, name: str):
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(self._entries))}")
        module, _, attribute = self._entries[name].partition(":")
        return getattr(importlib.import_module(module), attribute)


SAMPLERS = Registry(
    "sampler backend", {"hf": "idempo.sampling.hf:HFSampler", "vllm": "idempo.sampling.vllm:VLLMSampler"}
)
JUDGES = Registry(
    "judge",
    {
        "marker": "idempo.evaluation.markers:MarkerJudge",
        "openai": "idempo.evaluation.openai_judge:OpenAIJudge",
        "hf": "idempo.evaluation.hf_judge:HFJudge",
    },
)
TRAINERS = Registry(
    "trainer", {"local": "idempo.training.local:LocalTrainer", "zero": "idempo.training.zero:ZeroTrainer"}
)
# Each regime starts from the defaults of the paper it implements: the authors' DPO setup (lr 1e-5, cosine
# to 0) for every preference regime, and Yuan et al.'s M_{t+1} trained from M_t for self-rewarding; sft
# and sdf keep the field defaults (the authors' SFT setup).
_PREFERENCE_DEFAULTS = {"training": {"learning_rate": 1.0e-5, "min_lr_ratio": 0.0}}
REGIMES = Registry(
    "regime",
    {
        "sft": "idempo.regimes.supervised:SFT",
        "sdf": "idempo.regimes.supervised:SDF",
        "dpo": "idempo.regimes.preference:DPO",
        "kto": "idempo.regimes.preference:KTO",
        "self_reward": "idempo.regimes.self_reward:SelfReward",
    },
    {
        "sdf": {"documents": True},
        "dpo": {"defaults": _PREFERENCE_DEFAULTS, "seed_reads": {"beta": (), "preference": ()}},
        "kto": {
            "defaults": _PREFERENCE_DEFAULTS,
            "seed_reads": {"beta": (), "preference": ("desirable_weight", "undesirable_weight")},
        },
        "self_reward": {"defaults": {"init": "previous", **_PREFERENCE_DEFAULTS}, "seed_regime": "sft"},
    },
)


def trains_on_documents(regime: str) -> bool:
    """Whether a regime trains a base model on documents (prompts are document openings, answers their
    continuations) rather than an instruct model on chats."""
    return bool(REGIMES.info(regime).get("documents"))


def seed_regime(regime: str) -> str:
    """The regime whose loss trains M_seed (self_reward seeds by SFT)."""
    return REGIMES.info(regime).get("seed_regime", regime)
