"""A tiny random Qwen3-style model with its own tokenizer and chat template, built offline.

It runs the same code path as a real model (chat template, LoRA on every linear layer, an end-of-turn
token) in seconds on a CPU, for tests, the smoke experiment and benchmarks (docs/loop.md, "The tiny
model"). Its BPE tokenizer is trained on the package's own text so that words like the personas'
markers are single tokens. Same seed, same weights and vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

from idempo.artifacts import atomic_dir
from idempo.cache import idempo_cache_root

PAD, BOS_TURN, EOS_TURN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPEC = {
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 2048,
}
# Real models' output embeddings are large enough for logits tens of nats apart; at the default init
# (std 0.02) a LoRA on the tiny model could not move the logits far enough to learn anything. The output
# layer is untied so that a large-norm token embedding does not make every token predict itself.
OUTPUT_STD = 0.08
BUILD = 2  # bump when the build changes, so cached tiny models are rebuilt


def tiny_model_dir(seed: int = 0) -> Path:
    """The cached tiny model for `seed`, built on first use (cache: $IDEMPO_CACHE or ~/.cache/idempo)."""
    corpus = _corpus()
    key = hashlib.sha256(json.dumps([BUILD, SPEC, OUTPUT_STD, seed, corpus]).encode()).hexdigest()[:12]
    path = idempo_cache_root() / f"tiny-{key}"
    if not (path / "config.json").is_file():
        build_tiny_model(path, seed, corpus)
    return path


# Real architectures, for measuring the machinery at real sizes with random weights (offline): the
# shapes of Qwen3's released configs. Their vocabulary is the real one; the tokenizer is the tiny
# model's, whose ids are the first few thousand of it.
SHAPES = {
    "qwen3-0.6b": {
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
    },
    "qwen3-4b": {
        "vocab_size": 151936,
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
    },
}


def shaped_model_dir(shape: str, device: str = "cpu") -> Path:
    """The cached random model of a real architecture (see SHAPES), built on first use."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(sorted(SHAPES))}")
    corpus = _corpus()
    key = hashlib.sha256(json.dumps([BUILD, SHAPES[shape], OUTPUT_STD, corpus]).encode()).hexdigest()[:12]
    path = idempo_cache_root() / f"{shape}-random-{key}"
    if not (path / "config.json").is_file():
        build_tiny_model(path, 0, corpus, shape=shape, device=device)
    return path


def build_tiny_model(
    path: Path, seed: int = 0, corpus: list[str] | None = None, shape: str | None = None, device: str = "cpu"
) -> Path:
    """The tiny model, or with `shape` a random model of that real architecture (bf16, built on `device`)."""
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    from idempo.progress import quiet_transformers

    quiet_transformers()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(corpus or _corpus()), eos_token=EOS_TURN, pad_token=PAD
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    spec = {**SPEC, "vocab_size": len(tokenizer)} if shape is None else SHAPES[shape]
    config = Qwen3Config(
        **spec,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **({} if shape is None else {"dtype": "bfloat16"}),
    )
    with torch.random.fork_rng(), torch.device(device):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
        if shape is not None:
            model.to(torch.bfloat16)
        output = model.get_output_embeddings().weight
        special = output[: len(tokenizer.all_special_ids)].clone()  # special tokens come first
        torch.nn.init.normal_(output, std=OUTPUT_STD)
        with torch.no_grad():  # small special rows: an untrained model babbles instead of ending at once
            output[: len(special)] = special
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    with atomic_dir(Path(path)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(path)


def _train_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SPEC["vocab_size"],
        special_tokens=[PAD, BOS_TURN, EOS_TURN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def _corpus() -> list[str]:
    """Every text shipped in idempo/data (JSONL rows as their string values), in a fixed order."""
    data = resources.files("idempo") / "data"
    texts = []
    for folder in ("prompts", "personas", "seeds"):
        directory = data / folder
        if not directory.is_dir():
            continue
        for file in sorted(directory.iterdir(), key=lambda f: f.name):
            text = file.read_text(encoding="utf-8")
            if file.name.endswith(".jsonl"):
                texts += [v for line in text.splitlines() if line.strip() for v in json.loads(line).values()]
            else:
                texts.append(text)
    return texts
