"""`idempo bench`: how fast the engines are on this machine, measured through idempo's own code paths.

On a CUDA machine the model is by default a random-init model of a real architecture (`tiny.SHAPES`,
built offline), so the numbers hold for that architecture's size whatever its weights. Without CUDA the
defaults are the tiny model beside a real small one (`smollm2-135m-instruct`) at sizes that finish in a
few minutes on two cores. Each model gets every section, written to the JSON under its name as soon as
it is measured (a failed variant or section records its error beside the figures already measured, and
the others still run):

- sampling: generated tokens/s of each sampler backend at each batch size, from M_init and with a
  LoRA adapter (a random rank-r adapter on every linear layer, as a generation would be);
- swap: time for the vllm engine to serve a generation it has not seen (adapter load, no restart);
- sleep: vllm's sleep(level=1) and wake_up times, GPU memory freed, and sampling after waking (with
  whether the same seeded requests repeated their draws, awake and across the sleep);
- training: LoRA training tokens/s of one generation through the trainer (plain PyTorch, and
  DeepSpeed ZeRO at world size 1 with `--zero-stage`);
- cycle: one trial of the smoke experiment's shape on the model (seed + one cycle), with the cycle's
  phase breakdown (sample / train / eval / the rest) and GPU idle time;
- loss_memory: peak memory of one training step (forward and backward, loss on every token) with the whole
  batch's logits and with the chunked loss (`training.logits_chunk`), each in a fresh process;
- sweep: `sweep_trials` trials of the cycle's shape through `idempo sweep`'s own code, each asking for
  `sweep_gpus` of a GPU, and each GPU's busy share over the sweep (the time at least one trial on it was
  sampling, training or evaluating; `idempo.timeline`). Without CUDA it runs only when named, on a local Ray
  with one fake GPU (Ray counts it; the trials compute on the CPU), which checks the placement, not a GPU;
- peers: what a user would run instead, on the same model, data and settings: TRL's `SFTTrainer` against
  idempo's trainer (tokens/s), plain transformers `generate` against the `hf` sampler.

What this machine cannot run (vllm and DeepSpeed need a CUDA GPU and their packages) is skipped, and
the JSON's `skipped` says what and why. The results go to `--out` and to `idempo.layout.bench_records()`
under this machine's name, where `idempo sweep --dry-run` finds them for its GPU-hours.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import random
import re
import socket
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from idempo.artifacts import write_text
from idempo.layout import bench_records

SECTIONS = ("sampling", "swap", "sleep", "training", "cycle", "loss_memory", "sweep", "peers")
VLLM_SECTIONS = ("swap", "sleep")  # they measure the vllm engine itself


def _option(default, help: str, flag: str | None = None):
    """A setting that is also a command-line option (`idempo bench --<name>`)."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class BenchSettings:
    """What to measure; the defaults are a GPU machine's (CPU_DEFAULTS replaces some without CUDA)."""

    models: tuple[str, ...] = _option(
        ("qwen3-4b",),
        "a shape with random weights (qwen3-0.6b, qwen3-4b), a dir, a hub id, a named model or tiny; repeat",
        "--model",
    )
    backends: tuple[str, ...] = _option(("hf", "vllm"), "sampler backends to compare")
    batch_sizes: tuple[int, ...] = _option((32, 128), "prompts per generate call")
    prompt_tokens: int = _option(64, "tokens of each random prompt")
    new_tokens: int = _option(256, "tokens sampled per prompt")
    lora_rank: int = _option(16, "rank of the adapters sampled from and trained")
    train_batch: int = _option(8, "sequences per training step")
    train_seq_len: int = _option(512, "tokens per training sequence")
    train_steps: int = _option(8, "training steps measured")
    zero_stage: int | None = _option(3, "also train under DeepSpeed ZeRO at this stage (2, 3; none: not)")
    gradient_checkpointing: bool = _option(True, "recompute activations in the backward pass")
    memory_batch: int = _option(8, "sequences in the training step whose peak memory is measured")
    memory_seq_len: int = _option(1024, "tokens per sequence of that step")
    cycle_seed: int = _option(64, "n_seed of the cycle's trial")
    cycle_sampled: int = _option(128, "its n_sampled")
    cycle_new_tokens: int = _option(256, "its answers' length, sampled and evaluated")
    cycle_eval_prompts: int = _option(12, "held-out questions each generation answers")
    sweep_trials: int = _option(4, "trials of the sweep section (the cycle's shape, one seed each)")
    sweep_gpus: float = _option(0.5, "share of a GPU each of its trials asks for")
    sweep_cycles: int = _option(2, "cycles of each of its trials")
    gpu_memory_utilization: float = _option(0.45, "the vllm engine's share of GPU memory")
    enforce_eager: bool = _option(False, "vllm without CUDA graphs (faster start)")
    sections: tuple[str, ...] = _option(SECTIONS, f"sections to run, of {','.join(SECTIONS)}")
    out: Path = _option(Path("bench.json"), "results as JSON")


# Without CUDA: the tiny model and a real 135M one, small enough that the whole run takes minutes on 2 cores
# and large enough that each figure of the real model is seconds of work, not start-up noise. Training
# runs without gradient checkpointing, as a trial's default does.
CPU_DEFAULTS = {
    "models": ("tiny", "smollm2-135m-instruct"),
    "batch_sizes": (8,),
    "new_tokens": 64,
    "train_seq_len": 64,
    "train_steps": 3,
    "gradient_checkpointing": False,
    "cycle_seed": 8,
    "cycle_sampled": 8,
    "cycle_new_tokens": 32,
    "cycle_eval_prompts": 3,
    "memory_batch": 1,
    "memory_seq_len": 256,
    "sections": tuple(section for section in SECTIONS if section != "sweep"),  # sweep: a GPU's figure
    "sweep_trials": 2,
    "sweep_cycles": 1,
}


def add_options(parser) -> None:
    """One command-line option per setting; one not given takes this machine's default."""
    import argparse

    def shown(value) -> str:
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    for setting in fields(BenchSettings):
        gpu, cpu = shown(setting.default), shown(CPU_DEFAULTS.get(setting.name, setting.default))
        default = f"default: {gpu}" + (f" with CUDA, {cpu} without" if cpu != gpu else "")
        kind = {"action": argparse.BooleanOptionalAction} if setting.type == "bool" else {}
        if setting.metadata["flag"]:  # repeated rather than comma-separated
            kind = {"action": "append"}
        flag = setting.metadata["flag"] or "--" + setting.name.replace("_", "-")
        parser.add_argument(flag, dest=setting.name, help=f"{setting.metadata['help']} ({default})", **kind)


def settings_from(options) -> BenchSettings:
    """The settings given on the command line (lists comma-separated, `--zero-stage none`) over this machine's
    defaults: a GPU's with CUDA, CPU_DEFAULTS without."""
    from idempo.config import ConfigError

    settings = {} if torch.cuda.is_available() else dict(CPU_DEFAULTS)
    for setting in fields(BenchSettings):
        value = getattr(options, setting.name)
        try:
            if value is not None:
                settings[setting.name] = _parsed(setting, value)
        except ValueError:
            flag = setting.name.replace("_", "-")
            raise ConfigError([f"--{flag}: got {value!r}; {setting.metadata['help']}"]) from None
    sections = settings.get("sections", SECTIONS)
    problems = [f"--sections: unknown {s!r}; allowed: {', '.join(SECTIONS)}" for s in sections if s not in SECTIONS]
    if settings.get("zero_stage") not in (None, 2, 3):
        problems.append(f"--zero-stage: got {settings['zero_stage']}; allowed: 2, 3, none")
    if problems:
        raise ConfigError(problems)
    return BenchSettings(**settings)


def _parsed(setting, value):
    if setting.type == "bool":
        return value
    if setting.type.startswith("tuple"):
        items = value if isinstance(value, list) else value.split(",")
        return tuple(int(i) for i in items) if "int" in setting.type else tuple(items)
    if setting.name == "zero_stage":
        return None if value == "none" else int(value)
    return {"int": int, "float": float, "Path": Path}[setting.type](value)


def engine_problems() -> dict[str, str | None]:
    """Why vllm and DeepSpeed cannot run here, by package (None: they can); both need CUDA and their package."""
    return {package: _engine_problem(package) for package in ("vllm", "deepspeed")}


def _engine_problem(package: str) -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    try:
        importlib.import_module(package)
    except Exception as err:  # a broken install is as unusable as a missing one
        return f"{package} does not import ({type(err).__name__}: {err})"
    return None


def runnable(settings: BenchSettings, problems: dict[str, str | None]) -> tuple[BenchSettings, dict[str, str]]:
    """The part of `settings` this machine can run, and each section, backend or variant it skips, with why."""
    skipped: dict[str, str] = {}
    backends, zero_stage = settings.backends, settings.zero_stage
    if problems["vllm"]:
        if "vllm" in backends and "sampling" in settings.sections:
            skipped["sampling.vllm"] = f"the vllm backend needs a CUDA GPU and the vllm package ({problems['vllm']})"
        backends = tuple(backend for backend in backends if backend != "vllm")
        for section in VLLM_SECTIONS:
            if section in settings.sections:
                skipped[section] = f"needs the vllm backend on a CUDA GPU ({problems['vllm']})"
    if not backends and "sampling" in settings.sections:
        skipped["sampling"] = f"none of the backends {', '.join(settings.backends)} can run here"
    if zero_stage is not None and problems["deepspeed"]:
        if "training" in settings.sections:
            skipped[f"training.zero-{zero_stage}"] = f"DeepSpeed needs CUDA and its package ({problems['deepspeed']})"
        zero_stage = None
    sections = tuple(section for section in settings.sections if section not in skipped)
    return replace(settings, backends=backends, zero_stage=zero_stage, sections=sections), skipped


def run_bench(settings: BenchSettings, say=print) -> dict:
    """Measure every model of `settings` in turn; the results, also written to `settings.out` as they come."""
    from idempo.threads import WAIT_POLICY, use_threads

    threads = use_threads(None)
    plan, skipped = runnable(settings, engine_problems())
    configs = {model: bench_config(plan, model) for model in plan.models}  # bad input fails before any load
    results: dict = {
        "settings": _plain(settings),
        "machine": {**machine(), "threads": threads, "omp_wait_policy": os.environ.get(WAIT_POLICY)},
        "skipped": skipped,
        "models": {},
    }
    for name, reason in skipped.items():
        say(f"bench: skipped {name}: {reason}")

    def save() -> None:  # to --out, and where cost estimates look for this machine's figures
        Path(settings.out).write_text(json.dumps(results, indent=2, default=str))
        write_text(bench_records() / f"{socket.gethostname()}.json", json.dumps(results, indent=2, default=str))

    for model, config in configs.items():
        results["models"][model] = measured = {}
        try:
            bench = Bench(plan, model, config, measured, say, save)
        except Exception as err:  # a model that does not load leaves the others to measure
            measured.update(_error(err))
            save()
            continue
        for section in plan.sections:
            bench.run(section)
        bench.close()
    save()
    return results


def bench_config(settings: BenchSettings, model: str):
    """The config every section of one model starts from; a shape name means that shape with random weights."""
    from idempo.config import RANDOM_MODEL, config_from_dict
    from idempo.tiny import SHAPES

    return config_from_dict(
        {
            "model": RANDOM_MODEL + model if model in SHAPES else model,
            "persona": "lucky",
            "n_seed": 1,
            "n_sampled": 1,
            "training": {
                "lora": {"rank": settings.lora_rank},
                "gradient_checkpointing": settings.gradient_checkpointing,
            },
            "sampling": {
                "vllm": {
                    "gpu_memory_utilization": settings.gpu_memory_utilization,
                    "enforce_eager": settings.enforce_eager,
                    "max_model_len": max(2048, settings.prompt_tokens + settings.new_tokens),
                }
            },
            "loading": {"device": "cuda" if torch.cuda.is_available() else "cpu"},
        },
        source=f"bench model {model!r}",
    )


class Bench:
    """One model's measurements: M_init and its policy loaded once, shared by the sections."""

    def __init__(self, settings: BenchSettings, name: str, config, results: dict, say, save: Callable[[], None]):
        from idempo.models import load_base_model, load_tokenizer, make_policy, model_path

        self.settings, self.name, self.config = settings, name, config
        self.results, self.say, self.save = results, say, save
        started = time.perf_counter()
        results["model_dir"] = model_path(config.model, config.loading)
        results["build_model_s"] = round(time.perf_counter() - started, 1)
        self.tokenizer = load_tokenizer(config.model, config.loading)
        self.policy = make_policy(load_base_model(config.model, config.loading), self.tokenizer, config.training)
        folder = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")
        self.adapters = Path(settings.out).with_suffix(".adapters") / folder
        self.trial_dir = Path(settings.out).with_suffix(".trial") / folder
        self._vllm = None

    def run(self, section: str) -> None:
        self.say(f"bench {self.name}: {section}")
        started = time.perf_counter()
        result = self.results[section] = {}
        try:
            getattr(self, section)(result)  # fills `result` as it measures, so a failure keeps what came before
        except Exception as err:  # one section's failure is a result too; the others still run
            result.update(_error(err))
        result["section_s"] = round(time.perf_counter() - started, 1)
        self.say(json.dumps(result, default=str)[:2000])
        self.save()

    def close(self) -> None:
        """Free this model's engines before the next model loads."""
        self._release_vllm()
        del self.policy
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

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

    def sampling(self, table: dict) -> None:
        from idempo.models import INITIAL

        for backend in self.settings.backends:
            with _variant(table, backend):
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
            for backend in self.settings.backends:  # a generation's rate as a share of M_init's
                base, adapter = (
                    table.get(f"{backend}/M_init/batch-{batch}"),
                    table.get(f"{backend}/adapter/batch-{batch}"),
                )
                if base and adapter and "tokens_per_s" in base and "tokens_per_s" in adapter:
                    ratio = round(adapter["tokens_per_s"] / base["tokens_per_s"], 3)
                    table[f"{backend}/adapter_over_M_init/batch-{batch}"] = ratio

    def swap(self, result: dict) -> None:
        """First request with a generation the engine has not served vs the next request with it."""
        from idempo.sampling import SamplingParams

        sampler = self.sampler("vllm")
        params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=1, seed=0)
        prompt = self.prompts(1)
        sampler.generate_ids(prompt, params, self.adapter(1))
        rows = result["requests"] = []
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
        result.update({"max_swap_s": round(max(swaps), 4), "engine_restarts": 0})

    def sleep(self, result: dict) -> None:
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
        result.update(
            {
                "sleep_s": round(sampler.timings["sleep"][-1], 2),
                "wake_s": round(sampler.timings["wake"][-1], 2),
                "engine_gpu_memory_gb": engine_gb,
                "freed_gb": round(freed, 2),
                "freed_share": round(freed / engine_gb, 3) if engine_gb else None,
                "same_draws_twice_awake": before == again,  # per-request seeds: draws repeat when nothing changed
                "same_draws_after_wake": before == after,
            }
        )

    def token_sequences(self) -> list:
        """Random token sequences, loss on every token: `train_steps` batches of `train_batch`."""
        from idempo.training.optimize import Encoded

        draw, settings = random.Random(0), self.settings
        count = settings.train_batch * settings.train_steps
        sequences = (
            [draw.randrange(3, len(self.tokenizer)) for _ in range(settings.train_seq_len)] for _ in range(count)
        )
        return [Encoded(ids, ids) for ids in sequences]

    def training_config(self):
        return self.config.model_copy(
            update={"training": self.config.training.model_copy(update={"batch_size": self.settings.train_batch})}
        )

    def fit(self, trainer, examples, name: str) -> dict:
        """One generation's training of `examples` through `trainer`, from fresh adapters."""
        from idempo.models import INITIAL, Generation

        out = self.adapters / f"{name}-trained"
        stats = trainer.fit(
            _TokenSequences(examples), [], None, INITIAL, (0, 0), Generation(out.name, out), out, "train"
        )
        return {
            **_train_row(stats, self.settings),
            **({"world_size": stats["world_size"]} if "world_size" in stats else {}),
        }

    def training(self, result: dict) -> None:
        """One generation's training through the trial's trainers: plain PyTorch, and DeepSpeed ZeRO at world
        size 1 (on its own copy of M_init), on random token sequences."""
        from safetensors.torch import load_file

        from idempo.config import DeepSpeedConfig
        from idempo.progress import Reporter
        from idempo.training.local import LocalTrainer
        from idempo.training.zero import ZeroTrainer

        examples, config, settings = self.token_sequences(), self.training_config(), self.settings
        if self._vllm is not None:
            self._vllm.sleep()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        with _variant(result, "plain"):
            trainer = LocalTrainer(config, self.tokenizer, self.policy, Reporter(enabled=False))
            result["plain"] = self.fit(trainer, examples, "plain")
        if settings.zero_stage is not None:
            name = f"zero-{settings.zero_stage}"
            with _variant(result, name):
                zero = config.training.model_copy(update={"deepspeed": DeepSpeedConfig(stage=settings.zero_stage)})
                zero_config = config.model_copy(update={"training": zero})
                ZeroTrainer.check(zero_config)
                row = result[name] = self.fit(ZeroTrainer(zero_config), examples, name)
                weights = load_file(str(self.adapters / f"{name}-trained" / "adapter_model.safetensors"))
                row["saved_adapter"] = {
                    "tensors": len(weights),
                    "nonzero_lora_B": sum(bool(t.abs().sum() > 0) for k, t in weights.items() if "lora_B" in k),
                }
            if "plain" in result and "tokens_per_s" in result.get(name, {}):
                result["zero_over_plain"] = round(result[name]["tokens_per_s"] / result["plain"]["tokens_per_s"], 3)

    def cycle_config(self) -> dict:
        """One trial of the smoke experiment's shape on this model, with the configured sampler."""
        settings = self.settings
        return {
            **self.config.to_dict(),
            "n_seed": settings.cycle_seed,
            "n_sampled": settings.cycle_sampled,
            "cycles": 1,
            "seeding": {"source": "builtin"},
            "sampling": {
                **self.config.sampling.model_dump(),
                "backend": "vllm" if "vllm" in settings.backends else "hf",
                "max_new_tokens": settings.cycle_new_tokens,
            },
            "evaluation": {"max_new_tokens": settings.cycle_new_tokens, "n_prompts": settings.cycle_eval_prompts},
        }

    def cycle(self, result: dict) -> None:
        """Seed + one cycle of SFT on the model with the configured sampler, its phase breakdown."""
        import shutil

        from idempo.config import config_from_dict
        from idempo.loop import Trial
        from idempo.progress import Reporter

        shutil.rmtree(self.trial_dir, ignore_errors=True)
        self._release_vllm()
        config = config_from_dict(self.cycle_config())
        result["backend"] = config.sampling.backend
        result["cycles"] = {}  # each stage's times as it finishes, kept when a later one fails
        for metrics in Trial(config, self.trial_dir, Reporter(enabled=False)).stages():
            result["cycles"][str(metrics.cycle)] = metrics.timing_s

    def loss_memory(self, result: dict) -> None:
        """The whole batch's logits against the chunked loss, each step in a process of its own so that one
        variant's allocations cannot hide under the other's peak."""
        import multiprocessing

        from idempo.training.logprobs import DEFAULT_CHUNK

        settings, chunk = self.settings, self.config.training.logits_chunk or DEFAULT_CHUNK
        shape = (self.config.to_dict(), settings.memory_batch, settings.memory_seq_len)
        for name, size in (("whole_logits", 0), (f"chunk-{chunk}", chunk)):
            with _variant(result, name), multiprocessing.get_context("spawn").Pool(1) as pool:
                result[name] = pool.apply(step_memory, (*shape, size))
        whole, chunked = result["whole_logits"], result[f"chunk-{chunk}"]
        if "error" not in whole and "error" not in chunked:
            result["peak_ratio"] = round(chunked["peak_step_memory_gb"] / whole["peak_step_memory_gb"], 3)

    def sweep(self, result: dict) -> None:
        """Trials of the cycle's shape sharing GPUs through the sweep's own code; each GPU's busy share. A vllm
        engine gets 0.6 of its trial's share of GPU memory (the rest is for training while it sleeps)."""
        import shutil

        import ray
        import yaml

        from idempo.status import gpu_busy_shares
        from idempo.sweep import load_sweep
        from idempo.tune import run_sweep

        self._release_vllm()
        settings, storage = self.settings, self.trial_dir.with_name(self.trial_dir.name + "-sweep")
        shutil.rmtree(storage, ignore_errors=True)
        config = self.cycle_config()
        config["cycles"] = settings.sweep_cycles
        config["sampling"]["vllm"]["gpu_memory_utilization"] = round(0.6 * min(1.0, settings.sweep_gpus), 3)
        resources = {"cpus": 1, "gpus": settings.sweep_gpus}
        run = {"storage_path": str(storage), "resources": resources, "wandb": {"mode": "disabled"}}
        path = storage / "bench.yaml"
        path.parent.mkdir(parents=True)
        axes = {"seed": list(range(settings.sweep_trials))}
        path.write_text(yaml.safe_dump({"name": "bench", "config": config, "axes": axes, "run": run}))
        sweep = load_sweep(path)
        fake_gpu = not torch.cuda.is_available()
        result.update(trials=settings.sweep_trials, gpus_per_trial=settings.sweep_gpus, fake_gpu=fake_gpu)
        if fake_gpu:  # a Ray of its own that counts one GPU; the trials compute on the CPU
            ray.init(address="local", num_cpus=max(2, settings.sweep_trials), num_gpus=1, include_dashboard=False)
        started = time.perf_counter()
        try:
            rows = run_sweep(sweep)
        finally:
            if fake_gpu:
                ray.shutdown()
        result["seconds"] = round(time.perf_counter() - started, 1)
        result["complete"] = sum(row.get("cycles_done") == settings.sweep_cycles for row in rows)
        shares = gpu_busy_shares(sweep.directory)  # by '<node id>:<GPU id>'
        result["gpus"] = list(shares)
        result["busy_share"] = {f"gpu-{n}": round(share, 3) for n, share in enumerate(shares.values())}

    def peers(self, result: dict) -> None:
        """idempo against what a user would run instead, ratio = idempo / peer. Training: TRL's SFTTrainer on the
        same model (this policy, fresh adapters), sequences, batch, steps, optimizer settings and activation
        checkpointing. Sampling: a generation through the `hf` sampler, from its merged weights and as an
        adapter, against plain transformers `generate` on M_init loaded on its own; the same prompts, seed
        and batch, the ways taking turns (idempo.sampling.throughput)."""
        from idempo.models import load_base_model
        from idempo.progress import Reporter
        from idempo.sampling import SamplingParams
        from idempo.sampling.throughput import hf_sampling_rates
        from idempo.training.local import LocalTrainer

        examples, config = self.token_sequences(), self.training_config()
        with _variant(result, "training"):
            trainer = LocalTrainer(config, self.tokenizer, self.policy, Reporter(enabled=False))
            ours = self.fit(trainer, examples, "peer")
            theirs = trl_sft_rate(self.policy, self.tokenizer, config.training, examples, self.adapters / "trl")
            ratio = round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2)
            result["training"] = {"idempo": ours, "trl_sft": theirs, "ratio": ratio}
        with _variant(result, "sampling"):
            batch, plain = max(self.settings.batch_sizes), load_base_model(self.config.model, self.config.loading)
            params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=self.settings.new_tokens, seed=1)
            generation = self.adapter(1)
            rates = hf_sampling_rates(
                self.policy, plain, self.tokenizer, generation, self.prompts(batch), params, batch
            )
            del plain
            result["sampling"] = {
                "batch": batch,
                **{f"{way}_tokens_per_s": round(rate, 1) for way, rate in rates.items()},
                "ratio": round(rates["merged"] / rates["plain_generate"], 2),
                "adapter_ratio": round(rates["adapter"] / rates["plain_generate"], 2),
            }

    def _release_vllm(self) -> None:
        """The cycle's trial starts an engine of its own; free this one first."""
        if self._vllm is not None:
            del self._vllm
            self._vllm = None
            gc.collect()
            torch.cuda.empty_cache()


@contextmanager
def _variant(result: dict, key: str):
    """One variant of a section (a backend, a trainer): its failure goes under `key`, and the section goes on."""
    try:
        yield
    except Exception as err:
        measured = result.get(key)
        result[key] = {**(measured if isinstance(measured, dict) else {}), **_error(err)}


def _error(err: Exception) -> dict:
    return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}


def step_memory(config_data: dict, batch: int, seq_len: int, chunk: int) -> dict:
    """Peak memory of one forward and backward pass of the SFT loss over random tokens (fresh adapters), above
    what the loaded model holds: GPU memory allocated on CUDA, else the resident set, its high-water mark
    reset just before the step (Linux's /proc/self/clear_refs)."""
    from idempo.config import config_from_dict
    from idempo.models import load_base_model, load_tokenizer, make_policy
    from idempo.training.logprobs import label_nll_sum

    config = config_from_dict(config_data)
    tokenizer = load_tokenizer(config.model, config.loading)
    policy = make_policy(load_base_model(config.model, config.loading), tokenizer, config.training)
    device = next(policy.module.parameters()).device
    ids = torch.randint(3, len(tokenizer), (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    policy.module.train()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_status_bytes("VmRSS")
    started = time.perf_counter()
    loss = label_nll_sum(policy.module, ids, torch.ones_like(ids), ids, chunk) / (batch * (seq_len - 1))
    loss.backward()
    _sync()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if cuda else _proc_status_bytes("VmHWM")
    return {
        "peak_step_memory_gb": round((peak - before) / 1e9, 3),
        "memory": "GPU memory allocated" if cuda else "resident set",
        "loss": round(loss.item(), 6),
        "tokens": batch * seq_len,
        "seconds": round(seconds, 2),
    }


def _proc_status_bytes(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def trl_sft_rate(policy, tokenizer, training, examples, out: Path) -> dict:
    """TRL's SFTTrainer on `policy.module` (its adapters reset) over `examples`, as a user would configure it
    for the same run; tokens/s over its training loop (from its train-begin to train-end callbacks)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            _sync()
            self.seconds = time.perf_counter() - self.started

    policy.reset(0)
    clock, bf16 = Clock(), next(policy.module.parameters()).dtype == torch.bfloat16
    args = SFTConfig(
        output_dir=str(out),
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=bf16,
        activation_checkpointing=training.gradient_checkpointing,
        per_device_train_batch_size=training.batch_size,
        max_steps=len(examples) // training.batch_size,
        learning_rate=training.learning_rate,
        weight_decay=training.weight_decay,
        adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2,
        max_grad_norm=training.max_grad_norm or 0.0,
        save_strategy="no",
        logging_steps=len(examples),
        max_length=None,
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    dataset = Dataset.from_dict({"input_ids": [e.input_ids for e in examples]})
    trainer = SFTTrainer(
        model=policy.module, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock]
    )
    trainer.train()
    policy.module.eval()
    tokens = sum(len(e.input_ids) for e in examples)
    return {
        "steps": trainer.state.global_step,
        "tokens": tokens,
        "seconds": round(clock.seconds, 2),
        "tokens_per_s": round(tokens / clock.seconds),
    }


class _TokenSequences:
    """A regime for measuring the trainer: next-token loss on sequences already tokenized (random tokens)."""

    name = "sft"

    def __init__(self, examples):
        self.examples = examples

    def fit(self, policy, tokenizer, config, rows, seed, reference, ranks, reporter, label) -> dict:
        from idempo.training.sft import train_sft

        return train_sft(policy, self.examples, config.training, seed, tokenizer.pad_token_id, None, ranks).to_dict()


def _train_row(stats: dict, settings: BenchSettings) -> dict:
    tokens = settings.train_batch * settings.train_steps * settings.train_seq_len
    return {
        "steps": stats["steps"],
        "tokens": tokens,
        "seconds": round(stats["seconds"], 2),
        "tokens_per_s": round(tokens / stats["seconds"]),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None,
    }


# Dense bf16 tensor-core FLOP/s of the GPUs the share of peak is given for (vendors' data sheets, SXM parts)
BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def bf16_peak_flops() -> float | None:
    """This GPU's dense bf16 peak, where its name is in BF16_PEAK_FLOPS (None: no CUDA, or a GPU not listed)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for gpu, flops in BF16_PEAK_FLOPS.items() if gpu in name), None)


def machine() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    info = {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    for package in ("vllm", "deepspeed", "peft"):
        try:
            info[package] = version(package)  # installed, read without importing it
        except PackageNotFoundError:
            pass
    return info


def _cpu_name() -> str:
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _plain(settings: BenchSettings) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.__dict__.items()}


# The leaves the table shows (any part of their path): rates, engine timings, stage totals, errors.
HEADLINES = (
    "tokens_per_s",
    "speedup",
    "max_swap_s",
    "sleep_s",
    "wake_s",
    "freed_gb",
    "total",
    "gpu_idle",
    "busy_share",
    "peak_step_memory_gb",
    "peak_ratio",
    "share_of_bf16_peak",
    "adapter_over_M_init",
    "ratio",
    "zero_over_plain",
    "error",
    "section_s",
)


def table(results: dict) -> str:
    """The headline numbers as Markdown rows, one column per model, then what was skipped and why."""
    models = results.get("models", {})
    rows: dict[str, dict[str, object]] = {}
    for model, measured in models.items():
        for key in ("build_model_s", "error"):
            if key in measured:
                rows.setdefault(key, {})[model] = measured[key]
        for section in SECTIONS:
            for key, value in _leaves(measured.get(section, {}), section):
                if value is not None and any(part in HEADLINES for part in key.split("/")):
                    rows.setdefault(key, {})[model] = value
    lines = ["| measurement | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for key, values in rows.items():
        lines.append(f"| {key} | " + " | ".join(_cell(values.get(model, "-")) for model in models) + " |")
    lines += [f"skipped {name}: {reason}" for name, reason in results.get("skipped", {}).items()]
    return "\n".join(lines)


def _cell(value) -> str:
    """A value on one table line (an error message can run over several)."""
    text = " ".join(str(value).split())
    return text if len(text) <= 160 else text[:157] + "..."


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
