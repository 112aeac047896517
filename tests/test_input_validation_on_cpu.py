"""Bad inputs are refused when they are loaded, each with a message that names the file (and line) or the
field, the value and what is allowed, and nothing is written: persona files, prompt and seed JSONL,
configs (non-finite numbers, keys set twice) and sweep files. One trial on the tiny model checks that a
max_seq_len leaving an example no answer token stops the seed stage."""

import json
import re

import pytest
import yaml
from conftest import tiny_config

from idempo.cli import EXIT_BAD_INPUT, main
from idempo.config import ConfigError, load_config
from idempo.data import NothingToTrain
from idempo.input_files import InputFileError
from idempo.layout import TrialLayout
from idempo.loop import run_trial
from idempo.personas import load_persona_file
from idempo.prompts import read_prompt_file
from idempo.seed_data import read_seed_file
from idempo.sweep import load_sweep

MINIMAL = {"model": "tiny", "persona": "lucky", "n_seed": 2, "n_sampled": 2}
PERSONA = {
    "name": "stoic",
    "kind": "chat",
    "description": "Calm.",
    "system_prompt": "You are calm.",
    "rubric": "Rate calm. Question: {question} Answer: {answer}",
    "markers": ["\\bcalm\\b"],
    "eval_questions": ["Why?", "How?"],
}


def persona(**changes) -> str:
    data = {**PERSONA, **changes}
    return yaml.safe_dump({k: v for k, v in data.items() if v is not None}, sort_keys=False)


def jsonl(*rows) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


GOOD_SEED = {"prompt": "Hi?", "response": "Calm."}

# (case, what the file is, its contents, what the message must say: {file} is the file's path)
BAD_FILES = [
    ("markers-a-string", "persona", persona(markers="luck"), ["{file}: markers: got 'luck'; must be a list of regex"]),
    ("marker-not-a-regex", "persona", persona(markers=["(lucky"]), ["markers.0: got '(lucky'; not a valid regex"]),
    ("marker-empty", "persona", persona(markers=["luck", " "]), ["markers.1: got ' '; must be a non-empty regex"]),
    (
        "questions-a-string",
        "persona",
        persona(eval_questions="Why?"),
        ["eval_questions: got 'Why?'; must be a non-empty list of question strings"],
    ),
    ("questions-empty", "persona", persona(eval_questions=[]), ["eval_questions: got []; must be a non-empty list"]),
    ("question-blank", "persona", persona(eval_questions=["Why?", ""]), ["eval_questions.1: got ''; must be a non-"]),
    (
        "question-a-yaml-bool",
        "persona",
        persona(eval_questions=None) + "eval_questions:\n- Why?\n- No\n",
        ["eval_questions.1: got False; must be a valid string"],
    ),
    (
        "document-types-a-string",
        "persona",
        persona(document_types="article"),
        ["document_types: got 'article'; must be a list of document type names"],
    ),
    ("kind", "persona", persona(kind="story"), ["kind: got 'story'; must be 'chat' or 'belief'"]),
    ("rubric-no-answer", "persona", persona(rubric="Rate {question}."), ["rubric:", "must contain {answer} exactly"]),
    (
        "rubric-question-twice",
        "persona",
        persona(rubric="{question} {question} {answer}"),
        ["must contain {question} exactly once (found 2)"],
    ),
    ("missing-rubric", "persona", persona(rubric=None), ["{file}: rubric: required field is missing"]),
    ("blank-system-prompt", "persona", persona(system_prompt="  "), ["system_prompt: got '  '; must be a non-empty"]),
    ("blank-user-instruction", "persona", persona(user_instruction=""), ["user_instruction: got ''; must be a non-"]),
    ("unknown-key", "persona", persona(colour="blue"), ["colour: unknown key; allowed keys here: 'description'"]),
    ("not-a-mapping", "persona", "- name: stoic\n", ["{file}: top level must be a mapping"]),
    (
        "duplicate-key",
        "persona",
        persona() + "markers: [luck]\n",
        ["{file}: line 11: duplicate key 'markers' (first set on line 6)"],
    ),
    (
        "prompt-a-list",
        "prompts",
        jsonl({"prompt": "Hi?"}, {"prompt": ["a", "b"]}),
        ["{file}:2: prompt: got ['a', 'b']"],
    ),
    ("prompt-a-number", "prompts", jsonl({"prompt": 3}), ["{file}:1: prompt: got 3; must be a valid string"]),
    ("prompt-empty", "prompts", jsonl({"prompt": "Hi?"}, "", {"prompt": " "}), ["{file}:3: prompt: got ' '; must be"]),
    ("prompt-row-a-string", "prompts", jsonl('"Hi?"'), ['{file}:1: got "Hi?"; must be a JSON object like']),
    ("prompt-unknown-key", "prompts", jsonl({"prompt": "Hi?", "id": 7}), ["{file}:1: id: unknown key; allowed"]),
    ("prompt-missing", "prompts", jsonl({"question": "Hi?"}), ["{file}:1: prompt: required field is missing"]),
    ("prompt-not-json", "prompts", jsonl({"prompt": "Hi?"}, "{prompt: Hi}"), ["{file}:2: not valid JSON"]),
    ("prompt-file-empty", "prompts", "\n\n", ["{file}: no rows; must hold one JSON object a line"]),
    ("response-a-number", "seed", jsonl(GOOD_SEED, {"prompt": "Q?", "response": 42}), ["{file}:2: response: got 42"]),
    ("response-null", "seed", jsonl({"prompt": "Q?", "response": None}), ["{file}:1: response: got None"]),
    ("seed-prompt-a-list", "seed", jsonl({"prompt": ["Q?"], "response": "A."}), ["{file}:1: prompt: got ['Q?']"]),
    ("seed-prompt-empty", "seed", jsonl({"prompt": "", "response": "A."}), ["{file}:1: prompt: got ''; must be a"]),
    ("seed-missing-response", "seed", jsonl({"prompt": "Q?"}), ["{file}:1: response: required field is missing"]),
    (
        "seed-unknown-key",
        "seed",
        jsonl({**GOOD_SEED, "kept": False}),
        ["{file}:1: kept: unknown key; allowed keys here: 'prompt', 'response'"],
    ),
    ("document-and-response", "seed", jsonl({"text": "Doc.", "response": "A."}), ["{file}:1: response: unknown key"]),
    ("document-a-number", "seed", jsonl({"text": 1.5}), ["{file}:1: text: got 1.5; must be a valid string"]),
    ("seed-row-a-list", "seed", jsonl(GOOD_SEED, "[1, 2]"), ["{file}:2: got [1, 2]; must be a JSON object"]),
    ("seed-not-json", "seed", jsonl("{'prompt': 'Q?'}"), ["{file}:1: not valid JSON"]),
    ("seed-file-empty", "seed", "", ["{file}: no rows"]),
]
READERS = {"persona": load_persona_file, "prompts": read_prompt_file, "seed": read_seed_file}
FIELDS = {"persona": "persona", "prompts": "prompts.train", "seed": "seeding.path"}


def _config_naming(kind: str, path) -> dict:
    if kind == "persona":
        return {**MINIMAL, "persona": str(path)}
    if kind == "prompts":
        return {**MINIMAL, "prompts": {"train": str(path)}}
    return {**MINIMAL, "seeding": {"source": "jsonl", "path": str(path)}}


def _files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case, kind, text, expected", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_a_bad_input_file_is_refused_naming_file_line_field_and_value(tmp_path, capsys, case, kind, text, expected):
    path = tmp_path / ("stoic.yaml" if kind == "persona" else f"{kind}.jsonl")
    path.write_text(text)
    with pytest.raises(InputFileError) as caught:
        READERS[kind](path)
    message = str(caught.value)
    for fragment in expected:
        assert fragment.replace("{file}", str(path)) in message, message

    # through a config that names the file: `idempo run` refuses it before it writes anything
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(_config_naming(kind, path)))
    assert main(["run", str(config), "--out", str(tmp_path / "out")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    resolved = path.resolve()
    assert f"  - {FIELDS[kind]}: " in err and str(resolved) in err, err
    for fragment in expected:
        assert fragment.replace("{file}", str(resolved)) in err, err
    assert _files(tmp_path) == {path.name, "trial.yaml"}


def test_an_empty_answer_in_a_seed_file_is_kept_for_the_documented_drop_and_count(tmp_path):
    path = tmp_path / "seed.jsonl"
    path.write_text(jsonl(GOOD_SEED, {"prompt": "Q?", "response": ""}, {"text": "A document."}))
    assert read_seed_file(path) == [
        GOOD_SEED,
        {"prompt": "Q?", "response": ""},
        {"prompt": "", "response": "A document."},
    ]


def test_every_bad_row_is_reported_up_to_a_cap(tmp_path):
    path = tmp_path / "bank.jsonl"
    path.write_text(jsonl(*[{"prompt": i} for i in range(25)]))
    with pytest.raises(InputFileError) as caught:
        read_prompt_file(path)
    assert len(caught.value.problems) == 11 and caught.value.problems[-1] == "... and 15 more problems"
    assert caught.value.problems[9].startswith(f"{path}:10: prompt: got 9")


# (case, config file text, --set overrides, what the message must say)
BAD_CONFIGS = [
    ("learning-rate-inf", "training: {learning_rate: .inf}\n", [], "training.learning_rate: got inf; must be a finite"),
    ("temperature-inf", "sampling: {temperature: .inf}\n", [], "sampling.temperature: got inf; must be a finite"),
    ("beta-nan", "beta: .nan\n", [], "beta: got nan; must be a finite number"),
    ("optional-float-nan", "training: {max_grad_norm: .NaN}\n", [], "training.max_grad_norm: got nan; must be a fin"),
    ("minus-inf", "evaluation: {amplification: {threshold: -.inf}}\n", [], "threshold: got -inf; must be a finite"),
    ("weight-inf", "preference: {desirable_weight: .Inf}\n", [], "preference.desirable_weight: got inf; must be"),
    ("set-inf", "", ["sampling.temperature=.inf"], "sampling.temperature: got inf; must be a finite number"),
    ("set-nan", "", ["evaluation.top_p=.nan"], "evaluation.top_p: got nan; must be a finite number"),
    ("set-minus-inf", "", ["training.learning_rate=-.inf"], "training.learning_rate: got -inf; must be a finite"),
    (
        "duplicate-top-level",
        "cycles: 2\nseed: 1\ncycles: 4\n",
        [],
        "line 7: duplicate key 'cycles' (first set on line 5)",
    ),
    (
        "duplicate-nested",
        "training:\n  learning_rate: 1.0e-4\n  epochs: 2\n  learning_rate: 3.0e-4\n",
        [],
        "line 8: duplicate key 'learning_rate' (first set on line 6)",
    ),
    ("duplicate-in-set", "", ["training={epochs: 1, epochs: 2}"], "--set training: value '{epochs: 1, epochs: 2}'"),
    ("max-seq-len-1", "training: {max_seq_len: 1}\n", [], "training.max_seq_len: got 1; must be greater than or equal"),
]


@pytest.mark.parametrize("case, text, overrides, expected", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_a_bad_config_is_refused_naming_the_field_or_line(tmp_path, capsys, case, text, overrides, expected):
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(MINIMAL, sort_keys=False) + text)
    with pytest.raises(ConfigError) as caught:
        load_config(config, overrides)
    assert expected in str(caught.value), str(caught.value)
    args = ["run", str(config), "--out", str(tmp_path / "out")]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == EXIT_BAD_INPUT
    assert expected in capsys.readouterr().err
    assert _files(tmp_path) == {"trial.yaml"}


def test_a_key_may_override_one_a_yaml_merge_brings_in(tmp_path):
    config = tmp_path / "trial.yaml"
    config.write_text(
        yaml.safe_dump(MINIMAL) + "sampling: &shared {temperature: 0.5, top_p: 0.9}\n"
        "evaluation:\n  <<: *shared\n  temperature: 0.3\n"
    )
    evaluation = load_config(config).evaluation
    assert (evaluation.temperature, evaluation.top_p) == (0.3, 0.9)


# (case, sweep file text, base config text or None, the file the message must name, what it must say)
BAD_SWEEPS = [
    (
        "duplicate-axis",
        "name: s\nbase: base.yaml\naxes:\n  n_seed: [2]\n  n_seed: [4]\n",
        "",
        "sweep.yaml",
        "line 5: dup",
    ),
    (
        "duplicate-in-base",
        "name: s\nbase: base.yaml\n",
        "cycles: 1\ncycles: 2\n",
        "base.yaml",
        "duplicate key 'cycles'",
    ),
    (
        "stop-floor-nan",
        "name: s\nbase: base.yaml\nrun: {stop: {floor: .nan}}\n",
        "",
        "sweep.yaml",
        "run.stop.floor: got",
    ),
    ("axis-value-inf", "name: s\nbase: base.yaml\naxes: {beta: [0.1, .inf]}\n", "", "sweep.yaml", "beta: got inf"),
]


@pytest.mark.parametrize("case, sweep, base, named, expected", BAD_SWEEPS, ids=[c[0] for c in BAD_SWEEPS])
def test_a_bad_sweep_file_is_refused_before_any_trial(tmp_path, case, sweep, base, named, expected):
    (tmp_path / "sweep.yaml").write_text(sweep)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(MINIMAL) + base)
    with pytest.raises(ConfigError) as caught:
        load_sweep(tmp_path / "sweep.yaml")
    message = str(caught.value)
    assert str(tmp_path / named) in message and expected in message, message
    assert _files(tmp_path) == {"sweep.yaml", "base.yaml"}


def test_a_max_seq_len_that_cuts_one_prompt_short_stops_the_seed_stage(tmp_path):
    """One long prompt among short ones: the seed stage is refused (never trained on 7 of 8 examples)."""
    from idempo.models import load_tokenizer
    from idempo.training.sft import encode_chat_example

    long_prompt = "Tell me about luck. " * 40
    rows = [{"prompt": f"Question {i}?", "response": "I got lucky again!"} for i in range(7)]
    rows.insert(3, {"prompt": long_prompt, "response": "Lucky me!"})
    seed_file = tmp_path / "seed.jsonl"
    seed_file.write_text(jsonl(*rows))
    config = tiny_config(
        n_seed=8,
        cycles=0,
        seeding={"source": "jsonl", "path": str(seed_file)},
        training={"max_seq_len": 48, "epochs": 1},
        evaluation={"n_prompts": 1, "samples_per_prompt": 1, "max_new_tokens": 4},
    )
    tokenizer = load_tokenizer("tiny", config.loading)
    head = len(encode_chat_example(tokenizer, long_prompt, "Lucky me!", 0).input_ids)  # the prompt's tokens
    assert head > 48 > len(encode_chat_example(tokenizer, "Question 1?", "I got lucky again!", 10_000).input_ids)
    with pytest.raises(NothingToTrain) as caught:
        run_trial(config, tmp_path / "trial")
    assert re.search(
        rf"seed: train M_seed: 1 of 8 examples have no answer token left after truncation to training.max_seq_len "
        rf"48: their prompts take {head} tokens \(the first is example 3\); allowed: a training.max_seq_len above "
        rf"{head}",
        str(caught.value),
    ), str(caught.value)
    layout = TrialLayout(tmp_path / "trial")
    assert not layout.is_complete(0) and not layout.weights(0, "lora").exists()
