"""M_init and its generations.

M_init is loaded once per trial and stays frozen. A generation is a set of weights on top of it: a PEFT
LoRA adapter (the default) or, for small models, a full copy. The `Policy` holds the weights being
trained and sampled, knows which generation they are, and swaps generations in place, so nothing
reloads the base model between cycles.
"""

from __future__ import annotations

import copy
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from idempo.config import RANDOM_MODEL, TINY_MODEL, LoadingConfig, TrainingConfig
from idempo.named_models import NAMED_MODELS, gguf_model_dir, named_model_dir
from idempo.progress import quiet_transformers


class ModelLoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class Generation:
    """The weights of one generation; `path` None means M_init itself."""

    name: str
    path: Path | None = None


INITIAL = Generation("init")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"loading.device is {name!r} but no CUDA GPU is visible; use 'cpu' or 'auto'")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, name)


def model_path(model: str, loading: LoadingConfig | None = None) -> str:
    """A hub id or local dir. 'tiny' and 'random:SHAPE' are built, a named model (idempo.named_models) or a
    `.gguf` file converted in the dtype `loading` asks for, once, then cached and named by their dir."""
    if model == TINY_MODEL:
        from idempo.tiny import tiny_model_dir

        return str(tiny_model_dir())
    if model.startswith(RANDOM_MODEL):
        from idempo.tiny import shaped_model_dir

        return str(shaped_model_dir(model.removeprefix(RANDOM_MODEL), "cuda" if torch.cuda.is_available() else "cpu"))
    if model in NAMED_MODELS or model.endswith(".gguf"):
        loading = loading or LoadingConfig()
        dtype = str(resolve_dtype(loading.dtype, resolve_device(loading.device))).removeprefix("torch.")
        return str(named_model_dir(model, dtype) if model in NAMED_MODELS else gguf_model_dir(model, dtype))
    return model


def load_tokenizer(model: str, loading: LoadingConfig, chat: bool = True):
    """The model's tokenizer; `chat` requires a chat template (instruct models), document finetuning of
    base models does not."""
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_path(model, loading), revision=loading.revision, trust_remote_code=loading.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the tokenizer of model {model!r}: {err}") from None
    if chat and not tokenizer.chat_template:
        raise ModelLoadError(f"model {model!r} has no chat template; chat personas need an instruct model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model: str, loading: LoadingConfig) -> nn.Module:
    """M_init on the configured device and dtype, frozen and in eval mode."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(loading.device)
    try:
        base = AutoModelForCausalLM.from_pretrained(
            model_path(model, loading),
            dtype=resolve_dtype(loading.dtype, device),
            revision=loading.revision,
            trust_remote_code=loading.trust_remote_code,
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load model {model!r}: {err}") from None
    base.to(device).eval().requires_grad_(False)
    return base


class Policy(ABC):
    """The trainable weights of a trial: M_init plus the current generation."""

    module: nn.Module
    loaded: Generation | None = None  # which saved generation `module` holds; None: fresh or mid-training

    @abstractmethod
    def reset(self, seed: int) -> None:
        """Fresh weights from M_init (the `initial` init strategy); new adapters drawn from `seed`."""

    @abstractmethod
    def load(self, generation: Generation) -> None:
        """Make `module` hold a saved generation's weights."""

    def save(self, path: Path, generation: Generation | None = None) -> None:
        """Write the current weights as a directory the usual tools load; `generation`: they are that
        generation's from now on (its weights dir is `path` once renamed into place)."""
        self.write(path)
        self.loaded = generation

    @abstractmethod
    def write(self, path: Path) -> None:
        """The current weights as files in `path`."""

    @abstractmethod
    @contextmanager
    def use(self, generation: Generation) -> Iterator[nn.Module]:
        """A module that computes as `generation` does, for sampling and evaluation."""

    @contextmanager
    def merged(self, generation: Generation) -> Iterator[nn.Module]:
        """`use`, with the generation's weights as plain weights for the block (sampling at base-model speed);
        M_init is bit-identical afterwards. Full copies are plain weights already."""
        with self.use(generation) as module:
            yield module

    def named_weights(self, generation: Generation) -> Iterator[tuple[str, torch.Tensor]]:
        """The generation's weights under M_init's parameter names, one tensor at a time: what an engine that
        holds M_init loads to sample it."""
        with self.use(generation) as module:
            yield from ((name, p.detach()) for name, p in module.named_parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def start(self, start: Generation | None, seed: int) -> None:
        """Make the weights a generation's training starts from: fresh from M_init (`start` None, new adapters
        drawn from `seed`) or a saved generation's (kept if they are loaded already)."""
        if start is None or start.path is None:
            self.reset(seed)
        elif self.loaded != start:
            self.load(start)

    @contextmanager
    def weights_kept(self) -> Iterator[None]:
        """The trainable weights (and `loaded`) as they were before the block, which may swap generations in:
        a reference other than the start weights is read without disturbing the weights about to train."""
        saved = [p.detach().clone() for p in self.trainable_parameters()]
        loaded = self.loaded
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, value in zip(self.trainable_parameters(), saved, strict=True):
                    parameter.copy_(value)
            self.loaded = loaded


class LoraPolicy(Policy):
    """Generations are LoRA adapters on the frozen M_init (adapter name 'default', PEFT's layout)."""

    def __init__(self, base: nn.Module, training: TrainingConfig):
        from peft import LoraConfig, get_peft_model

        lora = training.lora
        self.lora_config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():  # PEFT reads a property transformers has renamed
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.module = get_peft_model(base, self.lora_config)
        self.module.eval()

    def reset(self, seed: int) -> None:
        from peft.tuners.lora import LoraLayer

        torch.manual_seed(seed)
        for layer in self.module.modules():
            if isinstance(layer, LoraLayer) and "default" in layer.lora_A:
                layer.reset_lora_parameters("default", init_lora_weights=True)
        self.loaded = None

    def load(self, generation: Generation) -> None:
        from peft import load_peft_weights, set_peft_model_state_dict

        device = next(self.module.parameters()).device
        weights = load_peft_weights(str(generation.path), device=str(device))
        result = set_peft_model_state_dict(self.module, weights)
        if result.unexpected_keys:
            raise ModelLoadError(f"adapter {generation.path} does not fit this model: {result.unexpected_keys[:3]}")
        self.loaded = generation

    def write(self, path: Path) -> None:
        self.module.save_pretrained(path)

    @contextmanager
    def use(self, generation: Generation) -> Iterator[nn.Module]:
        if generation.path is None:
            with self.module.disable_adapter():
                yield self.module
            return
        if self.loaded != generation:
            self.load(generation)
        yield self.module

    @contextmanager
    def merged(self, generation: Generation) -> Iterator[nn.Module]:
        """M_init's own model with each adapted layer's base linear put back in place of its LoRA layer, its weight
        swapped for a merged copy (W + B @ A * scaling): a plain model, as fast as one. Afterwards the LoRA layers
        and the original weight tensors are swapped back, never unmerged by subtraction (which drifts in bf16)."""
        if generation.path is None:
            with self.use(generation) as module:
                yield module
            return
        if self.loaded != generation:
            self.load(generation)
        layers = self._adapted_layers()
        merged = {name: _merged_weight(layer) for name, layer in layers.items()}
        originals = {name: layer.get_base_layer().weight for name, layer in layers.items()}
        try:
            for name, layer in layers.items():
                layer.get_base_layer().weight = nn.Parameter(merged.pop(name), requires_grad=False)
                self._put(name, layer.get_base_layer())
            yield self.module.get_base_model()
        finally:
            for name, layer in layers.items():
                self._put(name, layer)
                layer.get_base_layer().weight = originals[name]

    @torch.no_grad()
    def named_weights(self, generation: Generation) -> Iterator[tuple[str, torch.Tensor]]:
        """M_init's parameters by their own names (PEFT's prefixes and adapter tensors left out, as TRL's weight
        sync does), each adapted layer's weight merged as it is reached: one extra layer in memory at a time."""
        if generation.path is not None and self.loaded != generation:
            self.load(generation)
        adapted = {id(layer.get_base_layer().weight): layer for layer in self._adapted_layers().values()}
        for name, parameter in self.module.named_parameters():
            if self.module.prefix in name:  # lora_A, lora_B
                continue
            layer = adapted.get(id(parameter)) if generation.path is not None else None
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            yield name, parameter.detach() if layer is None else _merged_weight(layer)

    def _adapted_layers(self) -> dict[str, nn.Module]:
        """The LoRA layers that carry the 'default' adapter, by their names in `module`."""
        from peft.tuners.lora import LoraLayer

        return {
            name: layer
            for name, layer in self.module.named_modules()
            if isinstance(layer, LoraLayer) and "default" in layer.lora_A
        }

    def _put(self, name: str, layer: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.module.get_submodule(parent), child, layer)


@torch.no_grad()
def _merged_weight(layer) -> torch.Tensor:
    """A LoRA layer's base weight with its 'default' adapter folded in, as PEFT's merge computes it; for a plain
    linear layer in one fused W + scaling * B @ A (half the time of PEFT's three passes, a sampling call's
    fixed cost)."""
    base, adapter = layer.get_base_layer(), "default"
    weight = base.weight
    if isinstance(base, nn.Linear) and not layer.fan_in_fan_out and not layer.use_dora.get(adapter):
        b, a = (m[adapter].weight.to(weight.dtype) for m in (layer.lora_B, layer.lora_A))
        return torch.addmm(weight, b, a, alpha=layer.scaling[adapter])
    return weight + layer.get_delta_weight(adapter).to(weight.dtype)


class FullPolicy(Policy):
    """Generations are full copies of the weights (small models: twice M_init's memory)."""

    def __init__(self, base: nn.Module, tokenizer):
        self.base = base
        self.tokenizer = tokenizer
        self.module = copy.deepcopy(base).requires_grad_(True)

    def reset(self, seed: int) -> None:
        self.module.load_state_dict(self.base.state_dict())
        self.loaded = None

    def load(self, generation: Generation) -> None:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(generation.path, dtype=next(self.base.parameters()).dtype)
        self.module.load_state_dict(saved.state_dict())
        self.loaded = generation

    def write(self, path: Path) -> None:
        self.module.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    @contextmanager
    def use(self, generation: Generation) -> Iterator[nn.Module]:
        if generation.path is None:
            yield self.base
            return
        if self.loaded != generation:
            self.load(generation)
        yield self.module


def make_policy(base: nn.Module, tokenizer, training: TrainingConfig) -> Policy:
    return LoraPolicy(base, training) if training.finetune == "lora" else FullPolicy(base, tokenizer)
