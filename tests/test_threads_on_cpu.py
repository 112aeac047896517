"""CPU threads: idle OpenMP threads sleep unless the user chose otherwise, and torch uses the cores given."""

import os
import subprocess
import sys

import torch
from conftest import ROOT, tiny_config

from idempo import threads
from idempo.loop import run_trial


def test_the_wait_policy_is_passive_unless_the_user_set_one(monkeypatch):
    monkeypatch.delenv(threads.WAIT_POLICY, raising=False)
    monkeypatch.delenv(threads._OURS, raising=False)
    assert threads.passive_wait_policy() == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert threads.passive_wait_policy() == {"OMP_WAIT_POLICY": "PASSIVE"}, "ours again: workers get it too"
    monkeypatch.setenv(threads.WAIT_POLICY, "ACTIVE")
    monkeypatch.delenv(threads._OURS)
    assert threads.passive_wait_policy() == {} and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_command_line_sets_the_policy_before_torch_loads(tmp_path):
    """`idempo` sets it at start: the OpenMP runtime reads it once, when torch is imported."""
    script = (
        "import os, sys\n"
        "from idempo.cli import main\n"
        "assert 'torch' not in sys.modules, 'the command line imports torch only when a command needs it'\n"
        "main(['personas'])\n"
        "print(os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in (threads.WAIT_POLICY, threads._OURS)}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "PASSIVE"


def test_a_trial_computes_with_the_threads_it_is_given(tmp_path):
    before = torch.get_num_threads()
    try:
        run_trial(tiny_config(cycles=0, n_seed=8, loading__threads=1), tmp_path / "one")
        assert torch.get_num_threads() == 1
        run_trial(tiny_config(cycles=0, n_seed=8), tmp_path / "given")
        assert torch.get_num_threads() == threads.given_cores() == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)
