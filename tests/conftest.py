import os
from pathlib import Path

import pytest

from idempo.config import config_from_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def tiny_model_cache(tmp_path_factory):
    """Every test session builds its own tiny model (deterministic, about a second)."""
    os.environ["IDEMPO_CACHE"] = str(tmp_path_factory.mktemp("idempo-cache"))
    yield


def tiny_config(**overrides):
    """A fast trial on the tiny model: the `lucky` persona, its shipped seed data, marker scores."""
    data = {
        "model": "tiny",
        "persona": "lucky",
        "n_seed": 160,
        "n_sampled": 32,
        "cycles": 2,
        "seeding": {"source": "builtin"},
        "sampling": {"max_new_tokens": 48, "batch_size": 32},
        "training": {"learning_rate": 3.0e-3, "epochs": 4, "batch_size": 8},
        "evaluation": {"samples_per_prompt": 4, "max_new_tokens": 48},
        "loading": {"device": "cpu"},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[key] = value
    return config_from_dict(data)
