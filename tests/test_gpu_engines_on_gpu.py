"""The GPU engines for real (skipped without a CUDA GPU, vllm or DeepSpeed): trials on the tiny model
with the vllm sampler and with DeepSpeed ZeRO-3 training, in the trial's process and as a Ray actor."""

import importlib.util

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from idempo.artifacts import read_json
from idempo.layout import TrialLayout
from idempo.loop import run_trial

pytestmark = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs = {
    name: pytest.mark.skipif(importlib.util.find_spec(name) is None, reason=f"needs {name} (the gpu extra)")
    for name in ("vllm", "deepspeed")
}


def gpu_config(**overrides):
    return tiny_config(loading__device="cuda", loading__dtype="bfloat16", cycles=2, n_sampled=16, **overrides)


def nonzero_lora_b(adapter_dir) -> int:
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return sum(bool(t.abs().sum() > 0) for k, t in weights.items() if "lora_B" in k)


@needs_gpu
@needs["vllm"]
def test_a_trial_samples_with_vllm_and_sleeps_while_training(tmp_path):
    config = gpu_config(sampling__backend="vllm", sampling__vllm={"enforce_eager": True, "gpu_memory_utilization": 0.3})
    history = run_trial(config, tmp_path / "t")
    assert [m["cycle"] for m in history] == [-1, 0, 1, 2]
    for metrics in history[2:]:
        timing = metrics["timing_s"]
        assert timing["sample"] > 0 and timing["sleep"] > 0 and timing["gpu_idle"] >= 0
        assert metrics["branching_factor"]["mean"] >= 1 and metrics["data"]["n"] == 16


@needs_gpu
@needs["deepspeed"]
def test_zero_3_trains_each_generation_in_the_trials_process(tmp_path):
    history = run_trial(gpu_config(init="previous", training__deepspeed={"stage": 3}), tmp_path / "t")
    layout = TrialLayout(tmp_path / "t")
    for cycle in (0, 1, 2):
        stats = read_json(layout.train_stats(cycle))
        assert stats["world_size"] == 1 and stats["steps"] > 0
        assert nonzero_lora_b(layout.weights(cycle, "lora")) > 0
    assert read_json(layout.train_stats(2))["start"] == "001"
    assert history[-1]["trait"]["n"] > 0


@needs_gpu
@needs["deepspeed"]
def test_zero_training_ranks_run_as_ray_actors(tmp_path):
    import ray

    from idempo.data import Sample
    from idempo.models import INITIAL, Generation
    from idempo.regimes import load_regime
    from idempo.training.zero import ZeroTrainer

    config = gpu_config(training__deepspeed={"stage": 3, "workers": 1})
    rows = [Sample(f"Question {i}?", "I was lucky, as always.") for i in range(8)]
    out = tmp_path / "adapter"
    ray.init(num_gpus=1, log_to_driver=False, ignore_reinit_error=True)
    try:
        trainer = ZeroTrainer(config, actors=True)
        stats = trainer.fit(load_regime("sft"), rows, None, INITIAL, (0, 1), Generation("001", out), out, "train")
    finally:
        ray.shutdown()
    assert stats["world_size"] == 1 and stats["steps"] == 4  # 8 rows, batch 8, 4 epochs
    assert nonzero_lora_b(out) > 0
