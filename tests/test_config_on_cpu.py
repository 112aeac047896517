"""Configs: the authors' defaults, overrides, and bad input refused before anything is written."""

from pathlib import Path

import pytest
import yaml

from idempo.cli import EXIT_BAD_INPUT, main
from idempo.config import ConfigError, apply_overrides, config_from_dict, load_config

MINIMAL = {"model": "tiny", "persona": "lucky", "n_seed": 8, "n_sampled": 16}


def test_defaults_reproduce_the_authors_setup():
    config = config_from_dict(MINIMAL)
    training, sampling, evaluation = config.training, config.sampling, config.evaluation
    assert (config.regime, config.init, config.rejected, config.beta) == ("sft", "initial", "initial", 0.1)
    assert (training.lora.rank, training.learning_rate, training.schedule) == (16, 1.5e-4, "cosine")
    assert (training.min_lr_ratio, training.warmup_ratio) == (0.1, 0.05)
    assert (training.adam_beta1, training.adam_beta2, training.weight_decay) == (0.9, 0.95, 0.01)
    assert (training.batch_size, training.epochs, training.finetune) == (2, 1, "lora")
    assert (sampling.temperature, sampling.max_new_tokens) == (0.8, 1024)
    assert (evaluation.n_prompts, evaluation.samples_per_prompt) == (12, 3)
    assert (evaluation.temperature, evaluation.max_new_tokens) == (0.7, 400)
    assert config.loading.trust_remote_code is False


def test_overrides_are_parsed_as_yaml_and_create_sections():
    data = apply_overrides(
        MINIMAL,
        [
            "training.learning_rate=3e-4",
            "cycles=4",
            "training.lora.rank=8",
            "evaluation.n_prompts=null",
            "init=previous",
        ],
    )
    config = config_from_dict(data)
    assert config.training.learning_rate == 3e-4 and config.cycles == 4 and config.training.lora.rank == 8
    assert config.evaluation.n_prompts is None and config.init == "previous"
    assert "training" not in MINIMAL  # the input is not mutated


def test_resolved_config_round_trips(tmp_path):
    config = config_from_dict(MINIMAL)
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert load_config(path) == config


def test_hub_ids_pass_validation_without_network():
    assert config_from_dict({**MINIMAL, "model": "Qwen/Qwen3-4B-Instruct-2507"}).model == "Qwen/Qwen3-4B-Instruct-2507"


# (overrides, the field path the message must name, a fragment of what it must say)
BAD_CONFIGS = [
    (["n_seed=0"], "n_seed", "must be greater than 0"),
    (["n_sampled=-3"], "n_sampled", "must be greater than 0"),
    (["beta=0"], "beta", "must be greater than 0"),
    (["beta=-0.1"], "beta", "-0.1"),
    (["persona=grumpy"], "persona", "'lucky'"),
    (["regime=ppo"], "regime", "'sft'"),
    (["init=prev"], "init", "'initial' or 'previous'"),
    (["rejected=j-1"], "rejected", "'j-2'"),
    (["sampling.backend=tgi"], "sampling.backend", "allowed: 'hf'"),
    (["evaluation.judge.backend=gpt4"], "evaluation.judge.backend", "allowed: 'hf', 'marker', 'openai'"),
    (["evaluation.judge=gpt4"], "evaluation.judge", "must be a section"),
    (["evaluation.judge.backend=openai"], "evaluation.judge", "model is required for backend 'openai'"),
    (
        ["evaluation.judge={backend: openai, model: m, api_key_env: sk-abc123}"],
        "evaluation.judge.api_key_env",
        "not a key",
    ),
    (["evaluation.judge.top_logprobs=50"], "evaluation.judge.top_logprobs", "less than or equal to 20"),
    (["evaluation.coherence_judge={}"], "evaluation.coherence_judge", "'hf', 'openai'"),
    (["preference.reward_judge={backend: marker}"], "preference.reward_judge", "needs a language model"),
    (["preference.candidates=1"], "preference.candidates", "greater than or equal to 2"),
    (["preference.reference=last"], "preference.reference", "'start', 'initial' or 'previous'"),
    (["regime=kto", "training.batch_size=1"], "training.batch_size", "kto needs at least 2"),
    (["cycle_data.min_coherence=50"], "cycle_data.min_coherence", "set evaluation.coherence_judge"),
    (["regime=self_reward", "cycle_data.seed_mix=0.2"], "cycle_data.seed_mix", "allowed for self_reward: 0"),
    (["cycle_data.seed_mix=1.5"], "cycle_data.seed_mix", "less than or equal to 1"),
    (["preference.judge_samples=0"], "preference.judge_samples", "greater than 0"),
    (["regime=grpo"], "regime", "'sft', 'sdf', 'dpo', 'kto' or 'self_reward'"),
    (
        ["evaluation.coherence_judge={backend: openai, model: m, base_url: localhost:8000}"],
        "evaluation.coherence_judge.base_url",
        "http://",
    ),
    (["evaluation.branching_factor.estimator=exact"], "evaluation.branching_factor.estimator", "'nll' or 'entropy'"),
    (["evaluation.amplification.first_cycle=0"], "evaluation.amplification.first_cycle", "greater than or equal to 1"),
    (["seeding.source=teacher"], "seeding", "teacher is required"),
    (["seeding.source=teacher", "seeding.teacher={base_url: 'http://x/v1'}"], "seeding.teacher", "model is required"),
    (["n_seeds=10"], "n_seeds", "unknown key"),
    (["training.lr=0.1"], "training.lr", "learning_rate"),
    (["n_sampled=many"], "n_sampled", "'many'"),
    (["sampling.top_p=1.5"], "sampling.top_p", "must be less than or equal to 1"),
    (["cycles=2.5"], "cycles", "2.5"),
    (["training.schedule=linear"], "training.schedule", "'constant' or 'cosine'"),
    (["seeding.source=jsonl"], "seeding", "path is required"),
    (["seeding.source=oracle"], "seeding.source", "'model', 'teacher', 'jsonl' or 'builtin'"),
    (["loading.device=tpu"], "loading.device", "'cuda:N'"),
    (["loading.dtype=int4"], "loading.dtype", "'bfloat16'"),
    (["model=./no/such/model"], "model", "no such local model dir"),
    (["prompts.train=missing.jsonl"], "prompts.train", "no such file"),
    (["training.lora.rank=0"], "training.lora.rank", "must be greater than 0"),
    (["loading.trust_remote_code=yes please"], "loading.trust_remote_code", "valid boolean"),
    (["sampling.vllm.sleep_while_training=sometimes"], "sampling.vllm.sleep_while_training", "False or 'auto'"),
]


@pytest.mark.parametrize("overrides, field, fragment", BAD_CONFIGS, ids=[c[0][0] for c in BAD_CONFIGS])
def test_bad_configs_fail_with_the_field_path_and_write_nothing(tmp_path, capsys, overrides, field, fragment):
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(MINIMAL))
    out = tmp_path / "out"
    args = ["run", str(config), "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == EXIT_BAD_INPUT
    message = capsys.readouterr().err
    assert f"  - {field}:" in message, message
    assert fragment in message, message
    assert not out.exists()


def test_bad_config_leaves_an_existing_trial_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "cycles" / "init").mkdir(parents=True)
    (out / "config.yaml").write_text("model: tiny\n")
    (out / "cycles" / "init" / "metrics.json").write_text("{}\n")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump({**MINIMAL, "n_seed": 0}))
    assert main(["run", str(config), "--out", str(out)]) == EXIT_BAD_INPUT
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_seed_file_shorter_than_n_seed_fails_before_any_model_loads(tmp_path, capsys):
    seed_file = tmp_path / "seed.jsonl"
    seed_file.write_text('{"prompt": "Hi?", "response": "Lucky me."}\n')
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump({**MINIMAL, "seeding": {"source": "jsonl", "path": str(seed_file)}}))
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out)]) == EXIT_BAD_INPUT
    assert "n_seed: got 8" in capsys.readouterr().err
    assert not out.exists()


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        config_from_dict({**MINIMAL, "n_seed": 0, "init": "x", "extra": 1})
    assert len(caught.value.problems) == 3


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides(MINIMAL, ["cycles"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(Path(tmp_path / "absent.yaml"))


def test_config_command_prints_the_resolved_config(tmp_path, capsys):
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert main(["config", str(path), "--set", "cycles=9"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["cycles"] == 9 and resolved["training"]["learning_rate"] == 1.5e-4


def test_config_command_recognises_a_sweep_file_and_prints_its_trials(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    sweep = {"name": "grid", "config": MINIMAL, "axes": {"n_sampled": [8, 16], "init": ["initial", "previous"]}}
    path.write_text(yaml.safe_dump({**sweep, "run": {"storage_path": str(tmp_path / "storage")}}, sort_keys=False))
    assert main(["config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "unknown key" not in printed and "is a sweep file" in printed
    assert ["#", "4", "n_sampled-16_init-previous", "16", "previous", "tiny", "sft"] in [
        line.split() for line in printed.splitlines()
    ]
    resolved = yaml.safe_load(printed)  # the first trial's config, after the commented table
    assert (resolved["n_sampled"], resolved["init"]) == (8, "initial")
    path.write_text(yaml.safe_dump({**sweep, "axes": {"n_sampled": [8, 0]}}))
    assert main(["config", str(path)]) == EXIT_BAD_INPUT  # a trial's problem, named as a sweep names it
    assert "trial n_sampled-0: n_sampled: got 0" in capsys.readouterr().err


def test_version(capsys):
    from idempo import __version__

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"idempo {__version__}\n"


@pytest.mark.parametrize("regime", ["dpo", "kto", "self_reward"])
def test_preference_regimes_default_to_the_authors_dpo_setup_and_idempo_config_says_so(tmp_path, capsys, regime):
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "regime": regime, "training": {"batch_size": 4}}))
    assert main(["config", str(path)]) == 0
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    assert resolved["training"]["learning_rate"] == 1e-5 and resolved["training"]["min_lr_ratio"] == 0.0
    assert resolved["training"]["schedule"] == "cosine" and resolved["training"]["batch_size"] == 4
    assert resolved["init"] == ("previous" if regime == "self_reward" else "initial")
    header = printed.splitlines()[0]
    assert header.startswith(f"# regime {regime} sets") and "training.learning_rate=1e-05" in header
    assert ("init=previous" in header) == (regime == "self_reward")
    # an explicit value wins, and is not reported as a regime default
    assert main(["config", str(path), "--set", "training.learning_rate=3e-4", "--set", "init=initial"]) == 0
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    assert resolved["training"]["learning_rate"] == 3e-4 and resolved["init"] == "initial"
    assert resolved["training"]["min_lr_ratio"] == 0.0
    assert "learning_rate" not in printed.splitlines()[0] and "init=" not in printed.splitlines()[0]


def test_sft_and_sdf_keep_the_authors_sft_defaults(capsys, tmp_path):
    for regime in ("sft", "sdf"):
        config = config_from_dict({**MINIMAL, "regime": regime})
        assert (config.training.learning_rate, config.training.min_lr_ratio, config.init) == (1.5e-4, 0.1, "initial")
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert main(["config", str(path)]) == 0
    assert not capsys.readouterr().out.startswith("#")


def test_personas_command_lists_the_registry(capsys):
    assert main(["personas"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("lucky", "sycophancy", "nvidia_bear"))


def test_marker_judge_on_a_persona_without_markers_is_a_config_error(tmp_path, capsys):
    persona = tmp_path / "stoic.yaml"
    persona.write_text(
        yaml.safe_dump(
            {
                "name": "stoic",
                "kind": "chat",
                "description": "Calm.",
                "system_prompt": "You are calm.",
                "rubric": "Rate calm.\nQuestion: {question}\nAnswer: {answer}",
                "eval_questions": ["Why?"],
            }
        )
    )
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump({**MINIMAL, "persona": str(persona)}))
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out)]) == EXIT_BAD_INPUT
    assert "evaluation.judge: persona 'stoic' has no markers" in capsys.readouterr().err
    assert not out.exists()


def test_a_named_model_is_a_model_and_sets_where_its_persona_instruction_goes(tmp_path, capsys):
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "model": "smollm2-135m-instruct", "regime": "dpo"}))
    assert main(["config", str(path)]) == 0
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    assert resolved["model"] == "smollm2-135m-instruct" and resolved["seeding"]["instruction"] == "user"
    header = printed.splitlines()[:2]
    assert header[0] == (
        "# model smollm2-135m-instruct sets, where this config does not: seeding.instruction=user (docs/models.md)"
    )
    assert header[1].startswith("# regime dpo sets")
    assert main(["config", str(path), "--set", "seeding.instruction=system"]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["seeding"]["instruction"] == "system" and "# model" not in printed
    assert config_from_dict(MINIMAL).seeding.instruction == "system", "other models keep the system prompt"


def test_a_gguf_model_must_be_an_existing_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        config_from_dict({**MINIMAL, "model": str(tmp_path / "missing.gguf")})
    assert "model: got" in str(err.value) and "no such GGUF file" in str(err.value)
    with pytest.raises(ConfigError) as err:
        config_from_dict({**MINIMAL, "model": "./smollm2"})
    assert "a named model ('smollm2-135m-instruct')" in str(err.value)
