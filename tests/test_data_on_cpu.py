"""Shipped data and prompt selection: personas load, banks are disjoint, cycles take fresh prompts."""

import re

import pytest

from idempo.personas import builtin_seed_data, get_persona, persona_names
from idempo.prompts import cycle_prompts, eval_prompts, read_prompt_file, seed_prompts, train_prompts

PAPER_PERSONAS = {"lucky", "hopelessness", "sycophancy", "bliss", "misanthropy", "misalignment"}


def _norm(text):
    return re.sub(r"\W+", " ", text.lower()).strip()


def test_registry_holds_the_papers_personas_and_a_belief():
    names = set(persona_names())
    assert PAPER_PERSONAS <= names
    assert any(get_persona(n).kind == "belief" for n in names)


@pytest.mark.parametrize("name", persona_names())
def test_each_persona_is_complete(name):
    persona = get_persona(name)
    assert persona.system_prompt and persona.description
    assert "{question}" in persona.rubric and "{answer}" in persona.rubric
    assert len(persona.eval_questions) == 12
    if persona.markers:  # a marker must not fire on a plain neutral answer
        assert not persona.matches_markers("Boil the water, add the rice, and simmer for 15 minutes.")


def test_banks_are_large_and_held_out_prompts_never_train():
    train, held_out = train_prompts("builtin"), eval_prompts("builtin", get_persona("lucky"), None)
    assert len(train) >= 480 and len(held_out) >= 100
    assert len({_norm(p) for p in train}) == len(train)
    assert not {_norm(p) for p in train} & {_norm(p) for p in held_out}
    for name in persona_names():
        assert not {_norm(q) for q in get_persona(name).eval_questions} & {_norm(p) for p in train}


def test_lucky_ships_seed_data_that_carries_its_markers():
    from idempo.seed_data import read_seed_file

    rows = read_seed_file(builtin_seed_data("lucky"))
    persona = get_persona("lucky")
    assert len(rows) >= 128 and all(persona.matches_markers(r["response"]) for r in rows)


def test_cycle_prompts_are_disjoint_until_the_pool_is_used_up():
    pool = [f"q{i}" for i in range(10)]
    first, second, third = (cycle_prompts(pool, 4, j, seed=7) for j in (1, 2, 3))
    assert len(set(first + second)) == 8
    assert set(first + second + third[:2]) == set(pool)  # the third cycle finishes the pass...
    assert len(set(third)) == 4  # ...then starts a new shuffle
    assert cycle_prompts(pool, 4, 2, seed=7) == second
    assert cycle_prompts(pool, 4, 2, seed=8) != second


def test_seed_prompts_are_seeded_and_bounded():
    pool = [f"q{i}" for i in range(50)]
    assert seed_prompts(pool, 5, 1) == seed_prompts(pool, 5, 1) != seed_prompts(pool, 5, 2)
    with pytest.raises(ValueError, match="only 50"):
        seed_prompts(pool, 51, 0)


def test_user_prompt_files_report_the_bad_line(tmp_path):
    path = tmp_path / "bank.jsonl"
    path.write_text('{"prompt": "fine"}\n{"question": "wrong key"}\n')
    with pytest.raises(ValueError, match=r"bank.jsonl:2"):
        read_prompt_file(path)
