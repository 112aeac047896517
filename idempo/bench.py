"""`idempo bench`: how fast the engines are on this machine, measured through idempo's own code paths.

By default the model is a random-init model of a real architecture (`tiny.SHAPES`, built offline), so
the numbers hold for that architecture's size whatever its weights. Sections, each written to the JSON
as soon as it is measured (a failed section records its error and the others still run):

- sampling: generated tokens/s of each sampler backend at each batch size, from M_init and with a
  LoRA adapter (a random rank-r adapter on every linear layer, as a generation would be);
- swap: time for the vllm engine to serve a generation it has not seen (adapter load, no restart);
- sleep: vllm's sleep(level=1) and wake_up times, GPU memory freed, and sampling after waking (with
  whether the same seeded requests repeated their draws, awake and across the sleep);
- training: LoRA training tokens/s of one generation through the trainer (plain PyTorch, and
  DeepSpeed ZeRO at world size 1 with `--zero-stage`);
- cycle: one trial of the smoke experiment's shape on the model (seed + one cycle), with the cycle's
  phase breakdown (sample / train / eval / the rest) and GPU idle time.
"""

from __future__ import annotations

import json
import random
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

SECTIONS = ("sampling", "swap", "sleep", "training", "cycle")


@dataclass(frozen=True)
class BenchSettings:
    model: str  # a shape name from tiny.SHAPES, a local dir or a hub id
    backends: tuple[str, ...] = ("hf", "vllm")
    batch_sizes: tuple[int, ...] = (32, 128)
    prompt_tokens: int = 64
    new_tokens: int = 256
    lora_rank: int = 16
    train_batch: int = 8
    train_seq_len: int = 512
    train_steps: int = 8
    zero_stage: int | None = 3
    gpu_memory_utilization: float = 0.45
    enforce_eager: bool = False
    sections: tuple[str, ...] = SECTIONS
    out: Path = Path("bench.json")


def run_bench(settings: BenchSettings, say=print) -> dict:
    from idempo.config import RANDOM_MODEL
    from idempo.models import model_path
    from idempo.tiny import SHAPES

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    model = RANDOM_MODEL + settings.model if settings.model in SHAPES else settings.model
    results: dict = {"settings": _plain(settings), "machine": machine(), "model_dir": model_path(model)}
    results["build_model_s"] = round(time.perf_counter() - started, 1)
    bench = Bench(settings, model, device, results, say)
    for section in settings.sections:
        bench.run(section)
    return results


class Bench:
    def __init__(self, settings: BenchSettings, model: str, device: str, results: dict, say):
        from idempo.config import config_from_dict
        from idempo.models import load_base_model, load_tokenizer, make_policy

        self.settings, self.results, self.say = settings, results, say
        self.config = config_from_dict(
            {
                "model": model,
                "persona": "lucky",
                "n_seed": 1,
                "n_sampled": 1,
                "training": {"lora": {"rank": settings.lora_rank}, "gradient_checkpointing": True},
                "sampling": {
                    "vllm": {
                        "gpu_memory_utilization": settings.gpu_memory_utilization,
                        "enforce_eager": settings.enforce_eager,
                        "max_model_len": max(2048, settings.prompt_tokens + settings.new_tokens),
                    }
                },
                "loading": {"device": device},
            }
        )
        self.tokenizer = load_tokenizer(self.config.model, self.config.loading)
        self.policy = make_policy(
            load_base_model(self.config.model, self.config.loading), self.tokenizer, self.config.training
        )
        self.adapters = Path(settings.out).with_suffix(".adapters")
        self._vllm = None

    def run(self, section: str) -> None:
        self.say(f"bench: {section}")
        started = time.perf_counter()
        try:
            self.results[section] = getattr(self, section)()
        except Exception as err:  # one section's failure is a result too; the others still run
            self.results[section] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        self.results[section]["section_s"] = round(time.perf_counter() - started, 1)
        self.say(json.dumps(self.results[section], default=str)[:2000])
        Path(self.settings.out).write_text(json.dumps(self.results, indent=2, default=str))

    # -- helpers ----------------------------------------------------------------------------------

    def adapter(self, index: int):
        """A random LoRA adapter saved as a generation would be (non-zero, so it changes the outputs)."""
        from peft.tuners.lora import LoraLayer

        from idempo.models import Generation

        path = self.adapters / f"adapter-{index}"
        if not (path / "adapter_config.json").exists():
            self.policy.reset(index)
            torch.manual_seed(index)
            with torch.no_grad():
                for layer in self.policy.module.modules():
                    if isinstance(layer, LoraLayer) and "default" in layer.lora_B:
                        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.01)
            self.policy.save(path)
            self.policy.loaded = None
        return Generation(f"bench-{index}", path)

    def prompts(self, count: int, seed: int = 0) -> list[list[int]]:
        draw = random.Random(seed)
        specials = len(self.tokenizer.all_special_ids)
        return [
            [draw.randrange(specials, len(self.tokenizer)) for _ in range(self.settings.prompt_tokens)]
            for _ in range(count)
        ]

    def sampler(self, backend: str):
        from idempo.sampling import SAMPLERS

        if backend == "vllm":
            if self._vllm is None:
                SAMPLERS.load("vllm").check(self.config)
                started = time.perf_counter()
                free_before = torch.cuda.mem_get_info()[0]
                self._vllm = SAMPLERS.load("vllm").from_config(self.config, self.tokenizer, self.policy)
                self.results["vllm_engine"] = {
                    "start_s": round(time.perf_counter() - started, 1),
                    "gpu_memory_gb": round((free_before - torch.cuda.mem_get_info()[0]) / 1e9, 2),
                }
            return self._vllm
        return SAMPLERS.load(backend).from_config(self.config, self.tokenizer, self.policy)

    def throughput(self, sampler, batch: int, generation) -> dict:
        from idempo.sampling import SamplingParams

        params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=self.settings.new_tokens, seed=1)
        warm_up = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=1)
        sampler.generate_ids(self.prompts(min(batch, 4), seed=99), warm_up, generation)
        _sync()
        started = time.perf_counter()
        completions = sampler.generate_ids(self.prompts(batch), params, generation)
        _sync()
        seconds = time.perf_counter() - started
        tokens = sum(c.n_tokens + c.finished for c in completions)  # an end-of-turn token was generated too
        return {"batch": batch, "tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds)}

    # -- sections ---------------------------------------------------------------------------------

    def sampling(self) -> dict:
        from idempo.models import INITIAL

        table = {}
        for backend in self.settings.backends:
            sampler = self.sampler(backend)
            for batch in self.settings.batch_sizes:
                for name, generation in (("M_init", INITIAL), ("adapter", self.adapter(1))):
                    key = f"{backend}/{name}/batch-{batch}"
                    table[key] = self.throughput(sampler, batch, generation)
                    self.say(f"  {key}: {table[key]['tokens_per_s']} tok/s")
        for batch in self.settings.batch_sizes:
            for name in ("M_init", "adapter"):
                hf, vllm = table.get(f"hf/{name}/batch-{batch}"), table.get(f"vllm/{name}/batch-{batch}")
                if hf and vllm:
                    table[f"speedup/{name}/batch-{batch}"] = round(vllm["tokens_per_s"] / hf["tokens_per_s"], 1)
        return table

    def swap(self) -> dict:
        """First request with a generation the engine has not served vs the next request with it."""
        from idempo.sampling import SamplingParams

        sampler = self.sampler("vllm")
        params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=1, seed=0)
        prompt = self.prompts(1)
        sampler.generate_ids(prompt, params, self.adapter(1))
        rows = []
        for index in (2, 3, 4):
            generation = self.adapter(index)
            times = []
            for _ in range(2):
                _sync()
                started = time.perf_counter()
                sampler.generate_ids(prompt, params, generation)
                times.append(time.perf_counter() - started)
            rows.append(
                {"adapter": index, "first_request_s": round(times[0], 4), "loaded_request_s": round(times[1], 4)}
            )
        swaps = [r["first_request_s"] - r["loaded_request_s"] for r in rows]
        return {"requests": rows, "max_swap_s": round(max(swaps), 4), "engine_restarts": 0}

    def sleep(self) -> dict:
        from idempo.sampling import SamplingParams

        sampler = self.sampler("vllm")
        params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=32, seed=5)
        prompts, generation = self.prompts(8, seed=3), self.adapter(1)
        before = [c.token_ids for c in sampler.generate_ids(prompts, params, generation)]
        again = [c.token_ids for c in sampler.generate_ids(prompts, params, generation)]
        engine_gb = self.results["vllm_engine"]["gpu_memory_gb"]
        awake_free = torch.cuda.mem_get_info()[0]
        sampler.sleep()
        asleep_free = torch.cuda.mem_get_info()[0]
        sampler.wake()
        after = [c.token_ids for c in sampler.generate_ids(prompts, params, generation)]
        freed = (asleep_free - awake_free) / 1e9
        return {
            "sleep_s": round(sampler.timings["sleep"][-1], 2),
            "wake_s": round(sampler.timings["wake"][-1], 2),
            "engine_gpu_memory_gb": engine_gb,
            "freed_gb": round(freed, 2),
            "freed_share": round(freed / engine_gb, 3) if engine_gb else None,
            "same_draws_twice_awake": before == again,  # per-request seeds: draws repeat when nothing changed
            "same_draws_after_wake": before == after,
        }

    def training(self) -> dict:
        from idempo.training.sft import Encoded, train_sft

        draw = random.Random(0)
        vocabulary = len(self.tokenizer)
        settings = self.settings
        examples = [
            Encoded(ids, ids)
            for ids in (
                [draw.randrange(3, vocabulary) for _ in range(settings.train_seq_len)]
                for _ in range(settings.train_batch * settings.train_steps)
            )
        ]
        training = self.config.training.model_copy(update={"batch_size": settings.train_batch})
        if self._vllm is not None:
            self._vllm.sleep()
        result = {}
        pad = self.tokenizer.pad_token_id
        self.policy.reset(0)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        stats = train_sft(self.policy, examples, training, 0, pad)
        result["plain"] = _train_row(stats, settings)
        if settings.zero_stage is not None:
            from idempo.config import DeepSpeedConfig
            from idempo.training.zero import check, zero_policy

            zero_config = self.config.model_copy(
                update={
                    "training": training.model_copy(update={"deepspeed": DeepSpeedConfig(stage=settings.zero_stage)})
                }
            )
            check(zero_config)
            policy = zero_policy(zero_config, None, 0)
            try:
                stats = train_sft(policy, examples, zero_config.training, 0, pad)
                result[f"zero-{settings.zero_stage}"] = _train_row(stats, settings)
                saved = self.adapters / "zero-trained"
                policy.save(saved)
            finally:
                policy.close()
            from safetensors.torch import load_file

            weights = load_file(str(saved / "adapter_model.safetensors"))
            result[f"zero-{settings.zero_stage}"]["saved_adapter"] = {
                "tensors": len(weights),
                "nonzero_lora_B": sum(bool(t.abs().sum() > 0) for k, t in weights.items() if "lora_B" in k),
                "world_size": torch.distributed.get_world_size(),
            }
        return result

    def cycle(self) -> dict:
        """Seed + one cycle of SFT on the model with the configured sampler, its phase breakdown."""
        import shutil

        from idempo.config import config_from_dict
        from idempo.loop import run_trial

        out = Path(self.settings.out).with_suffix(".trial")
        shutil.rmtree(out, ignore_errors=True)
        self._release_vllm()
        backend = "vllm" if "vllm" in self.settings.backends else "hf"
        config = config_from_dict(
            {
                **self.config.to_dict(),
                "n_seed": 64,
                "n_sampled": 128,
                "cycles": 1,
                "seeding": {"source": "builtin"},
                "sampling": {**self.config.sampling.model_dump(), "backend": backend, "max_new_tokens": 256},
                "evaluation": {"max_new_tokens": 256},
            }
        )
        history = run_trial(config, out)
        return {"backend": backend, "cycles": {str(m["cycle"]): m["timing_s"] for m in history}}

    def _release_vllm(self) -> None:
        """The cycle's trial starts an engine of its own; free this one first."""
        if self._vllm is not None:
            import gc

            del self._vllm
            self._vllm = None
            gc.collect()
            torch.cuda.empty_cache()


def _train_row(stats, settings: BenchSettings) -> dict:
    tokens = settings.train_batch * settings.train_steps * settings.train_seq_len
    return {
        "steps": stats.steps,
        "tokens": tokens,
        "seconds": round(stats.seconds, 2),
        "tokens_per_s": round(tokens / stats.seconds),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None,
    }


def machine() -> dict:
    import platform

    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    for package in ("vllm", "deepspeed", "peft"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            pass
    return info


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _plain(settings: BenchSettings) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.__dict__.items()}


def table(results: dict) -> str:
    """The headline numbers as Markdown rows."""
    lines = ["| measurement | value |", "|---|---|"]
    for section in SECTIONS:
        for key, value in _leaves(results.get(section, {}), section):
            lines.append(f"| {key} | {value} |")
    return "\n".join(lines)


def _leaves(node, prefix):
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "traceback":
                yield from _leaves(value, f"{prefix}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, f"{prefix}/{index}")
    else:
        yield prefix, node
