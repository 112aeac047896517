"""GPU engines seen from a CPU machine: chosen by config, refused with a clear message before any model
loads, and the parts that run anywhere (GPU idle accounting, gradients through the policy's updates,
the DeepSpeed config, real-architecture shapes) checked here. The GPU runs themselves are recorded in
docs/benchmarks.md."""

import importlib.util

import pytest
import torch
from conftest import tiny_config

from idempo.cli import main
from idempo.config import ConfigError, DeepSpeedConfig, config_from_dict
from idempo.engines import check_engines
from idempo.gpu_monitor import GpuMonitor, busy_seconds
from idempo.layout import TrialLayout
from idempo.loop import Trial
from idempo.progress import Reporter
from idempo.sampling import SAMPLERS
from idempo.sampling.vllm import VLLMSampler, engine_lora_rank
from idempo.training.zero import deepspeed_config

NO_GPU = not torch.cuda.is_available()


def test_the_sampler_engine_is_chosen_by_config():
    assert SAMPLERS.load(tiny_config(sampling__backend="vllm").sampling.backend) is VLLMSampler
    with pytest.raises(ConfigError, match=r"sampling.backend: got 'vllama'.*allowed: 'hf', 'vllm'"):
        tiny_config(sampling__backend="vllama")


@pytest.mark.skipif(not NO_GPU, reason="checks the message a machine without a GPU gets")
def test_vllm_without_a_gpu_fails_before_any_model_loads(tmp_path):
    config = tiny_config(sampling__backend="vllm")
    with pytest.raises(ConfigError) as caught:
        Trial(config, tmp_path / "trial", Reporter(enabled=False))
    message = str(caught.value)
    assert "sampling.backend: got 'vllm' but no CUDA GPU is visible" in message
    if importlib.util.find_spec("vllm") is None:
        assert "pip install -e '.[gpu]'" in message
    assert not TrialLayout(tmp_path / "trial").config.exists()  # nothing was claimed or loaded


@pytest.mark.skipif(not NO_GPU, reason="checks the message a machine without a GPU gets")
def test_the_command_line_says_what_is_missing(tmp_path, capsys):
    import yaml

    config = tiny_config(sampling__backend="vllm", training__deepspeed={"stage": 3})
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "sampling.backend: got 'vllm'" in error and "training.deepspeed: no CUDA GPU is visible" in error


def test_engines_that_cannot_serve_the_generations_are_refused_at_load_time():
    with pytest.raises(ConfigError, match="training.finetune must be 'lora'"):
        tiny_config(sampling__backend="vllm", training__finetune="full")
    with pytest.raises(ConfigError, match="offload_params needs stage 3"):
        tiny_config(training__deepspeed={"stage": 2, "offload_params": True})
    with pytest.raises(ConfigError, match=r"training.deepspeed.stage"):
        tiny_config(training__deepspeed={"stage": 1})


def test_merged_vllm_sampling_is_refused_for_an_engine_across_gpus():
    def problems(weights: str) -> str:
        config = tiny_config(
            sampling__backend="vllm", sampling__weights=weights, sampling__vllm={"tensor_parallel_size": 2}
        )
        try:
            VLLMSampler.check(config)
        except ConfigError as err:
            return str(err)
        return ""

    assert "use sampling.weights 'adapter' with sampling.vllm.tensor_parallel_size > 1" in problems("merged")
    assert "sampling.weights" not in problems("adapter")


def test_the_hf_engine_runs_anywhere():
    check_engines(tiny_config())


def test_vllm_lora_ranks_round_up_to_what_the_engine_serves():
    assert [engine_lora_rank(r) for r in (1, 8, 16, 17, 64, 512)] == [8, 8, 16, 32, 64, 512]
    with pytest.raises(ConfigError, match="training.lora.rank: got 1024"):
        engine_lora_rank(1024)


def test_the_deepspeed_config_follows_the_training_config():
    training = tiny_config(
        training__deepspeed={"stage": 3, "offload_optimizer": True},
        training__gradient_accumulation_steps=4,
        training__max_grad_norm=0.5,
    ).training
    ds = deepspeed_config(training, bf16=True, world_size=2)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in ds["zero_optimization"]
    assert ds["train_batch_size"] == training.batch_size * 4 * 2
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"]
    assert ds["managed_gradient_accumulation"] is False  # our steps call engine.step() once per update
    assert DeepSpeedConfig().stage == 3


def test_gpu_busy_time_integrates_the_utilization_samples():
    samples = [(1.0, 1.0), (2.0, 0.5), (3.0, 0.0), (4.5, 1.0)]
    # [0,1] at 100%, [1,2] at 50%, [2,3] at 0%, [3,4] at 100% (cut at the end)
    assert busy_seconds(samples, start=0.0, end=4.0) == pytest.approx(2.5)
    with GpuMonitor() as monitor:
        pass
    assert monitor.wall_s >= 0
    if NO_GPU:
        assert monitor.busy_s is None and monitor.idle_s is None


def test_a_cycle_records_its_total_time_beside_its_phases(tmp_path):
    from idempo.loop import run_trial

    history = run_trial(tiny_config(cycles=1, n_sampled=8, evaluation__samples_per_prompt=1), tmp_path / "t")
    for metrics in history:
        timing = metrics["timing_s"]
        assert timing["total"] >= sum(v for k, v in timing.items() if k not in ("total", "gpu_busy", "gpu_idle"))
    assert {"sample", "train", "eval"} <= set(history[-1]["timing_s"])


def test_real_architecture_shapes_are_models_a_config_can_name():
    config = config_from_dict({"model": "random:qwen3-4b", "persona": "lucky", "n_seed": 1, "n_sampled": 1})
    assert config.model == "random:qwen3-4b"
    with pytest.raises(ConfigError, match="model: got 'random:qwen9'.*allowed: 'random:qwen3-0.6b'"):
        config_from_dict({"model": "random:qwen9", "persona": "lucky", "n_seed": 1, "n_sampled": 1})


def test_the_qwen3_4b_shape_has_the_released_parameter_count():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from idempo.tiny import SHAPES

    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**SHAPES["qwen3-4b"], tie_word_embeddings=False))
    total = sum(p.numel() for p in model.parameters())
    # Qwen3-4B: 4.02B with tied embeddings; untied, the output layer adds 151936 x 2560
    assert total == pytest.approx(4.02e9 + 151936 * 2560, rel=0.01)


def test_data_parallel_ranks_split_every_micro_batch():
    from idempo.training.zero import shard_plan

    plan = [[[0, 1, 2, 3], [4, 5, 6]], [[7]]]
    assert shard_plan(plan, 0, 1) == plan
    assert shard_plan(plan, 0, 2) == [[[0, 2], [4, 6]], [[7]]]
    assert shard_plan(plan, 1, 2) == [[[1, 3], [5]], [[7]]]  # a rank without an item repeats the first
    ranks = [shard_plan(plan, r, 3) for r in range(3)]
    assert sorted(i for shards in ranks for i in shards[0][0]) == [0, 1, 2, 3]


def test_training_ranks_get_placement_group_bundles_of_their_own(tmp_path, capsys):
    from sweep_helpers import write_sweep

    from idempo.placement import TrialPlacement
    from idempo.sweep import load_sweep
    from idempo.tune import max_concurrent, placement, training_ranks

    path = write_sweep(
        tmp_path,
        "zero",
        axes={"training.deepspeed.workers": [1, 4]},
        config={"training": {"deepspeed": {"stage": 3}}},
        run={"resources": {"cpus": 4, "gpus": 1}},
    )
    sweep = load_sweep(path)
    assert training_ranks(sweep) == 4
    request = placement(sweep).bundles
    assert request == [{"CPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}] + [{"CPU": 1.0, "GPU": 1.0}] * 4
    assert max_concurrent(request, "auto", {"CPU": 96, "GPU": 16}) == 3  # 5 GPUs a trial
    assert max_concurrent(TrialPlacement.for_trial(4, 1).bundles, "auto", {"CPU": 96, "GPU": 16}) == 16
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert "'GPU': 1.0}, {'CPU': 1.0, 'GPU': 1.0}" in capsys.readouterr().out
