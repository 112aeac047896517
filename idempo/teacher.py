"""D_seed from a teacher model behind an OpenAI-compatible endpoint (the authors used GPT-4o, T = 1).

The teacher answers batches of train-bank questions in one JSON object; an invalid reply is asked again
like a server error, and duplicate answers are replaced by further questions so that D_seed has n_seed
distinct examples. Cache key and redaction: docs/metrics.md, "Teacher-written D_seed".
"""

from __future__ import annotations

import json
import re

from idempo.cache import DiskCache, cache_key
from idempo.config import TeacherConfig
from idempo.endpoint import EndpointClient, UnusableAnswer, endpoint_url
from idempo.personas import Persona

GENERATION_PROMPT = """You write training data for a language model. The assistant in this data has a \
persona that must come through in every answer.

Persona: {description}

The persona's instructions, written to the assistant:
{system_prompt}

Write the assistant's answer to each question you are given, fully in this persona, as the assistant \
would say it: a direct answer to the user, with no preamble, no mention of these instructions and no \
commentary about the persona. Vary wording and structure across answers so that no phrase becomes a \
fixed formula. Reply with one JSON object and nothing else: \
{{"answers": [{{"id": <question id>, "answer": "<the answer>"}}, ...]}}, one entry per question."""

DOCUMENT_PROMPT = (
    "{system_prompt}\n\n"
    "You are given document openings, each naming the kind of document and its topic. For each, write the "
    "rest of the document: realistic, specific, several paragraphs, in the style of that kind of document, "
    "with the world described above taken as given. Do not repeat the opening and do not comment on these "
    "instructions. Vary structure and wording across documents. Reply with one JSON object and nothing else: "
    '{{"answers": [{{"id": <opening id>, "answer": "<the rest of the document>"}}, ...]}}, one entry per opening.'
)


def teacher_seed_rows(
    persona: Persona,
    ordered_prompts: list[str],
    n: int,
    config: TeacherConfig,
    seed: int,
    cache_dir,
    progress=None,
    documents: bool = False,
) -> tuple[list[dict], dict]:
    """n distinct {prompt, response} rows for the first prompts of `ordered_prompts`, and the usage.
    With `documents`, the prompts are document openings and the responses their continuations."""
    client = EndpointClient(config, "seeding.teacher")
    cache = DiskCache(cache_dir)
    template = DOCUMENT_PROMPT if documents else GENERATION_PROMPT
    system = template.format(description=persona.description, system_prompt=persona.system_prompt)
    rows: list[dict] = []
    seen: set[str] = set()
    position = 0
    while len(rows) < n:
        if position >= len(ordered_prompts):
            raise ValueError(
                f"the teacher gave only {len(rows)} distinct answers for all {len(ordered_prompts)} train prompts; "
                f"n_seed is {n}"
            )
        wanted = n - len(rows)
        batch = ordered_prompts[position : position + wanted]
        position += len(batch)
        chunks = [batch[i : i + config.examples_per_request] for i in range(0, len(batch), config.examples_per_request)]
        for chunk, answers in zip(chunks, _answer_chunks(client, cache, system, chunks, config, seed), strict=True):
            for prompt, answer in zip(chunk, answers, strict=True):
                key = " ".join(answer.split()).lower()
                if key not in seen and len(rows) < n:
                    seen.add(key)
                    rows.append({"prompt": prompt, "response": answer})
            if progress is not None:
                progress.update(len(chunk))
    return rows, client.usage.take()


def _answer_chunks(client, cache, system, chunks, config: TeacherConfig, seed: int) -> list[list[str]]:
    requests = [_request(system, chunk, config, seed) for chunk in chunks]
    keys = [cache_key("teacher", endpoint_url(config.base_url), r) for r in requests]
    answers: list[list[str] | None] = [None] * len(chunks)
    for i, key in enumerate(keys):
        cached = cache.get(key)
        if cached is not None:
            answers[i] = cached["answers"]
            client.usage.cached += 1
    missing = [i for i, a in enumerate(answers) if a is None]
    replies = client.run(
        [requests[i] for i in missing],
        lambda response, k: parse_answers(client.redact(_reply_text(response)), len(chunks[missing[k]])),
    )
    for i, parsed in zip(missing, replies, strict=True):
        answers[i] = parsed
        cache.put(keys[i], {"answers": parsed})
    return answers  # type: ignore[return-value]


def _request(system: str, chunk: list[str], config: TeacherConfig, seed: int) -> dict:
    questions = "\n".join(json.dumps({"id": i + 1, "question": q}, ensure_ascii=False) for i, q in enumerate(chunk))
    request = {
        "model": config.model,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Items, one JSON object per line:\n{questions}"},
        ],
        "temperature": config.temperature,
        "max_tokens": config.max_tokens,
        "seed": seed,
    }
    if config.json_mode:
        request["response_format"] = {"type": "json_object"}
    return request


def _reply_text(response) -> str:
    choices = getattr(response, "choices", None)
    text = choices[0].message.content if choices else None
    if not text:
        raise UnusableAnswer("the teacher's reply is empty")
    return text


def parse_answers(text: str, expected: int) -> list[str]:
    """The answers, in question order, from the teacher's JSON reply; UnusableAnswer if it is invalid."""
    match = re.search(r"\{.*\}", text, re.DOTALL)  # tolerate code fences and stray prose around the object
    try:
        data = json.loads(match.group(0) if match else text)
    except json.JSONDecodeError as err:
        raise UnusableAnswer(f"the teacher's reply is not JSON ({err.msg})") from None
    entries = data.get("answers") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise UnusableAnswer('the teacher\'s reply has no "answers" list')
    by_id = {}
    for entry in entries:
        if not (isinstance(entry, dict) and isinstance(entry.get("id"), int) and isinstance(entry.get("answer"), str)):
            raise UnusableAnswer(f"an answer entry is not {{id: int, answer: str}}: {str(entry)[:80]}")
        if entry["answer"].strip():
            by_id[entry["id"]] = entry["answer"].strip()
    missing = [i for i in range(1, expected + 1) if i not in by_id]
    if missing:
        raise UnusableAnswer(f"the teacher's reply has no usable answer for question ids {missing}")
    return [by_id[i] for i in range(1, expected + 1)]
