"""`idempo bench` on a machine without CUDA: with no flags it measures what the machine can run, the tiny
model and a real small one side by side, and names what it skipped and why; a variant that fails keeps
the figures its section had already measured."""

import json
import os
import socket

import pytest
import torch
from sweep_helpers import write_sweep

import idempo.bench
from idempo.cli import main
from idempo.cost import estimate
from idempo.layout import bench_records
from idempo.sweep import load_sweep

WAYS = ("merged", "adapter", "plain_generate")  # of sampling a generation, against plain `generate`
SMALL = ["--model", "tiny", "--backends", "hf", "--batch-sizes", "2", "--new-tokens", "4"]
SMALL += ["--train-seq-len", "16", "--train-steps", "2", "--train-batch", "2"]


def test_bench_with_no_flags_measures_both_cpu_models_and_names_what_it_skipped(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same run on a GPU host
    out = tmp_path / "bench.json"
    assert main(["bench", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert list(results["models"]) == ["tiny", "smollm2-135m-instruct"]
    for measured in results["models"].values():
        assert [s for s in idempo.bench.SECTIONS if s in measured] == [
            "sampling",
            "training",
            "cycle",
            "loss_memory",
            "peers",
        ]
        assert measured["sampling"]["hf/M_init/batch-8"]["tokens_per_s"] > 0
        assert measured["sampling"]["hf/adapter/batch-8"]["tokens_per_s"] > 0
        assert measured["training"]["plain"]["tokens_per_s"] > 0
        assert measured["cycle"]["cycles"]["1"]["sample"] > 0 and measured["cycle"]["cycles"]["1"]["train"] > 0
        whole, chunked = measured["loss_memory"]["whole_logits"], measured["loss_memory"]["chunk-256"]
        assert whole["tokens"] == chunked["tokens"] == 256 and chunked["loss"] == pytest.approx(whole["loss"], rel=1e-5)
        assert whole["peak_step_memory_gb"] > 0 and chunked["peak_step_memory_gb"] > 0
        peers = measured["peers"]["training"]
        assert peers["idempo"]["tokens"] == peers["trl_sft"]["tokens"] == 8 * 3 * 64 and peers["trl_sft"]["steps"] == 3
        assert peers["ratio"] == round(peers["idempo"]["tokens_per_s"] / peers["trl_sft"]["tokens_per_s"], 2)
        sampling = measured["peers"]["sampling"]
        assert sampling["batch"] == 8 and min(sampling[f"{way}_tokens_per_s"] for way in WAYS) > 0
        merged_over_plain = sampling["merged_tokens_per_s"] / sampling["plain_generate_tokens_per_s"]
        assert sampling["ratio"] == pytest.approx(merged_over_plain, abs=0.011)
        assert '"error"' not in json.dumps(measured)
    skipped = results["skipped"]
    assert set(skipped) == {"sampling.vllm", "swap", "sleep", "training.zero-3"}
    assert all("no CUDA GPU is visible" in reason for reason in skipped.values())
    assert results["machine"]["threads"] >= 1
    assert results["machine"]["omp_wait_policy"] == os.environ["OMP_WAIT_POLICY"]
    printed = capsys.readouterr().out
    assert "| measurement | tiny | smollm2-135m-instruct |" in printed
    assert "| training/plain/tokens_per_s |" in printed
    assert "skipped swap: needs the vllm backend on a CUDA GPU (no CUDA GPU is visible)" in printed
    assert "skipped training.zero-3: DeepSpeed needs CUDA" in printed


def test_bench_measures_the_hf_engine_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", *SMALL, "--zero-stage", "none", "--sections", "sampling,training", "--out", str(out)]) == 0
    tiny = json.loads(out.read_text())["models"]["tiny"]
    assert tiny["sampling"]["hf/M_init/batch-2"]["tokens"] > 0
    assert tiny["sampling"]["hf/adapter/batch-2"]["tokens_per_s"] > 0
    assert tiny["training"]["plain"]["steps"] == 2
    assert "| sampling/hf/M_init/batch-2/tokens_per_s |" in capsys.readouterr().out
    # this machine's figures also go where a sweep's cost estimate finds them, and give its GPU-hours
    record = bench_records() / f"{socket.gethostname()}.json"
    assert json.loads(record.read_text()) == json.loads(out.read_text())
    sweep = load_sweep(write_sweep(tmp_path, "priced", run={"resources": {"cpus": 1, "gpus": 2}}))
    cost = estimate(sweep, bench_dir=record.parent)
    sampled, trained = cost.total.sampled_tokens, cost.total.trained_tokens
    rates = tiny["sampling"]["hf/adapter/batch-2"]["tokens_per_s"], tiny["training"]["plain"]["tokens_per_s"]
    assert cost.gpu_hours == pytest.approx((sampled / rates[0] + trained / rates[1]) / 3600 * 2)


def test_a_failed_zero_run_keeps_the_plain_training_figure(tmp_path, monkeypatch):
    # Taken for runnable here, ZeRO fails in its own check (no CUDA, no deepspeed) after plain training ran.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(idempo.bench, "engine_problems", lambda: {"vllm": "no CUDA GPU is visible", "deepspeed": None})
    out = tmp_path / "bench.json"
    assert main(["bench", *SMALL, "--zero-stage", "3", "--sections", "training", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    training = results["models"]["tiny"]["training"]
    assert training["plain"]["steps"] == 2 and training["plain"]["tokens_per_s"] > 0
    assert "no CUDA GPU is visible" in training["zero-3"]["error"]
    assert "error" not in training and results["skipped"] == {}


def test_bench_runs_trials_sharing_a_fake_gpu_and_reads_the_gpu_busy_share(tmp_path):
    """Named on a machine without CUDA, the sweep section runs its trials through the sweep's own code on a
    local Ray that counts one GPU, two trials at half of it, and lays their phase timelines over each other."""
    out = tmp_path / "bench.json"
    args = ["--model", "tiny", "--backends", "hf", "--cycle-new-tokens", "8", "--sections", "sweep"]
    assert main(["bench", *args, "--sweep-trials", "2", "--sweep-cycles", "1", "--out", str(out)]) == 0
    sweep = json.loads(out.read_text())["models"]["tiny"]["sweep"]
    assert sweep["fake_gpu"] and sweep["complete"] == 2 and sweep["gpus_per_trial"] == 0.5
    assert len(sweep["gpus"]) == 1 and 0 < sweep["busy_share"]["gpu-0"] <= 1
