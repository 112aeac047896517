"""Work that several trials of a sweep share, done once: M_init's evaluation and the seed stage.

Trials whose stage reads the same inputs (`stage_inputs`) get the same stage. The first trial to reach
it runs it in its own trial dir, under a lock, and publishes the files to
`<sweep>/shared/<stage>-<key>/`; a trial that reaches it later (or waits on the lock meanwhile) links the
published files into its own cycle dir. Hard links where the filesystem allows (copies elsewhere), so
the replicas' M_seed adapters are byte-identical files and no space is spent twice. Each trial dir stays
complete on its own: reports, resume and `idempo eval` read it as any other. An entry carries the
records of what it holds (its manifest.json files, idempo.records), and a trial checks every file of an
entry against them before it links them in.

Why it matters: on a GPU a retrain with the same seed is not bitwise the same model, and the paper's
replication study (Figure 14) separates "same M_seed, new seeds for M >= 1" from "retrained M_seed".
Sharing makes the first literal. The lock is a POSIX record lock (`lockf`), which NFS carries across
nodes, so trials on several nodes share through the sweep's storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from idempo.artifacts import atomic_dir, file_sha256, json_text, locked, write_text
from idempo.config import ENDPOINT_PACE, ExperimentConfig
from idempo.layout import INIT_CYCLE, SEED_CYCLE, VALUES_BEFORE_FIELD, TrialLayout
from idempo.records import MANIFEST, Records, read_manifest, recorded
from idempo.registry import REGIMES, seed_regime, trains_on_documents

STAGES = {INIT_CYCLE: "init", SEED_CYCLE: "seed"}
FORMAT = 1  # part of every key: a change in what a stage writes starts new entries

# How hard an endpoint is leaned on, not what it answers, and whether its answers are kept: never part of a key.
_ENDPOINT_PACE = (*ENDPOINT_PACE, "cache")


def stage_inputs(config: ExperimentConfig, cycle: int) -> dict[str, Any]:
    """Everything the stage's results depend on (and nothing else), so that equal inputs mean equal work."""
    data = config.to_dict()
    evaluation = _judged_evaluation(data["evaluation"])
    if cycle == INIT_CYCLE:
        return {
            "model": data["model"],
            "loading": data["loading"],
            "persona": data["persona"],
            "prompts.eval": data["prompts"]["eval"],
            "evaluation": evaluation,
            "sampling": {k: data["sampling"][k] for k in ("backend", "batch_size", "vllm")},
            "seeding.seed": data["seeding"]["seed"],  # the seed of M_init's evaluation
            "completion": trains_on_documents(config.regime),
        }
    regime = seed_regime(config.regime)  # the seed stage's loss is this regime's (self_reward: sft's)
    inputs = {k: v for k, v in data.items() if k not in ("cycles", "seed", "n_sampled", "init", "rejected")}
    inputs.update(regime=regime, evaluation=evaluation)
    inputs.pop("cycle_data")
    # the cycles' only: their temperature, and how a generation's weights are sampled (the seed stage samples M_init)
    inputs["sampling"] = {k: v for k, v in data["sampling"].items() if k not in ("temperature", "weights")}
    reads = REGIMES.info(regime).get("seed_reads", {})  # what beyond the training settings its loss reads
    if "beta" not in reads:
        inputs.pop("beta")
    if "preference" in reads:
        inputs["preference"] = {k: data["preference"][k] for k in reads["preference"]}
    else:
        inputs.pop("preference")
    if data["seeding"].get("teacher"):
        inputs["seeding"] = {**data["seeding"], "teacher": _without_pace(data["seeding"]["teacher"])}
    for field, before in VALUES_BEFORE_FIELD.items():  # a stage that computes as before the field keeps its key
        section, _, name = field.partition(".")
        if inputs.get(section, {}).get(name, before) == before:
            inputs.get(section, {}).pop(name, None)
    return inputs


def stage_key(config: ExperimentConfig, cycle: int) -> str:
    """A digest of the stage's inputs, with the contents of the files they name (persona, prompts, D_seed)."""
    inputs = stage_inputs(config, cycle)
    files = {path: file_sha256(path) for path in sorted(_file_values(inputs))}
    text = json.dumps({"format": FORMAT, "stage": STAGES[cycle], "inputs": inputs, "files": files}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def stage_groups(configs: dict[str, ExperimentConfig], cycle: int) -> dict[str, list[str]]:
    """Trial names by the key of their stage: each group runs the stage once."""
    groups: dict[str, list[str]] = {}
    for name, config in configs.items():
        groups.setdefault(stage_key(config, cycle), []).append(name)
    return groups


class SharedStages:
    """A sweep's store of shared stages under `root`; `cycles` names the stages that are shared."""

    def __init__(self, root: str | Path, cycles: tuple[int, ...] = (INIT_CYCLE, SEED_CYCLE)):
        self.root = Path(root)
        self.cycles = cycles

    def covers(self, cycle: int) -> bool:
        return cycle in self.cycles

    def run(
        self,
        cycle: int,
        config: ExperimentConfig,
        layout: TrialLayout,
        produce: Callable[[dict], None],
        say: Callable[[str], None] = lambda message: None,
        records: Records | None = None,
    ) -> None:
        """Give the trial at `layout` the stage: link it from the store, or `produce(note)` it in the trial's
        own dir (the note goes into its metrics.json) and publish it. `records` writes and checks the trial's
        own files (the trial's, so that what it checked once is not hashed again)."""
        key = stage_key(config, cycle)
        entry = self.root / f"{STAGES[cycle]}-{key}"
        records = records or Records(layout.redo_hint, say)
        started = time.perf_counter()
        with locked(self.root / f".{entry.name}.lock", lambda: say(f"waiting for {entry.name}: another trial runs it")):
            if (entry / "stage.json").exists():
                _import(entry, layout, cycle, time.perf_counter() - started, records, say)
                return
            produce({"key": key, "entry": entry.name, "origin": layout.root.name, "reused": False})
            _publish(entry, layout, cycle, key, records)


def _entry_records(entry: Path, say: Callable[[str], None]) -> Records:
    return Records(lambda path: f"delete {entry} to have the next trial that reaches the stage run it again", say)


def _import(entry: Path, layout: TrialLayout, cycle: int, waited: float, records: Records, say) -> None:
    """The entry's files into the trial's cycle dir, metrics.json last: the cycle is complete at the rename.
    Every file of the entry is checked against its record first, and the trial's manifest records the
    linked files as the entry does (and the trial's own metrics.json)."""
    checked = _entry_records(entry, say)
    stage = checked.read_json(entry / "stage.json")
    check_recorded(checked, entry / "cycle")
    metrics = checked.read_json(entry / "cycle" / "metrics.json")
    metrics.pop("judge_usage", None)  # paid by the trial that ran the stage, not by this one
    if isinstance(metrics.get("data"), dict):
        metrics["data"].pop("teacher_usage", None)
    metrics["shared"] = {
        "key": stage["key"],
        "entry": entry.name,
        "origin": stage["origin"],
        "reused": True,
        "origin_timing_s": metrics.get("timing_s"),
    }
    metrics["timing_s"] = {"shared_wait": round(waited, 3), "total": round(waited, 3)}
    if (entry / "initial-answers.jsonl").exists():  # M_init's answers to D_seed's prompts (dpo, kto)
        existing = records.read_jsonl(layout.initial_answers) if layout.initial_answers.exists() else []
        known = {row["prompt"]: row["response"] for row in existing}
        known.update({row["prompt"]: row["response"] for row in checked.read_jsonl(entry / "initial-answers.jsonl")})
        records.write_jsonl(layout.initial_answers, [{"prompt": p, "response": r} for p, r in known.items()])
    with atomic_dir(layout.cycle_dir(cycle)) as tmp:
        _link_tree(entry / "cycle", tmp, skip={"metrics.json", MANIFEST})
        linked = {k: v for k, v in read_manifest(entry / "cycle" / MANIFEST).items() if k != "metrics.json"}
        if linked:
            write_text(tmp / MANIFEST, json_text(linked))
        Records(layout.redo_hint).write_json(tmp / "metrics.json", metrics)


def _publish(entry: Path, layout: TrialLayout, cycle: int, key: str, records: Records) -> None:
    """The trial's finished stage into the store; stage.json, written last, says the entry is complete."""
    if not layout.is_complete(cycle):
        raise RuntimeError(f"{layout.cycle_dir(cycle)} is not complete; nothing to publish")
    entry.mkdir(parents=True, exist_ok=True)
    with atomic_dir(entry / "cycle") as tmp:
        _link_tree(layout.cycle_dir(cycle), tmp)
    published = _entry_records(entry, lambda message: None)
    if cycle == SEED_CYCLE and layout.initial_answers.exists():
        prompts = {row["prompt"] for row in records.read_jsonl(layout.data(SEED_CYCLE))}
        rows = [row for row in records.read_jsonl(layout.initial_answers) if row["prompt"] in prompts]
        published.write_jsonl(entry / "initial-answers.jsonl", rows)
    published.write_json(
        entry / "stage.json",
        {"key": key, "stage": STAGES[cycle], "origin": layout.root.name, "origin_dir": str(layout.root)},
    )


def check_recorded(records: Records, directory: Path) -> None:
    """Every file and weights dir `directory`'s manifest records is what was recorded; a dir without a
    manifest (an entry published before idempo kept records) has its files parsed, with a note."""
    entries = read_manifest(directory / MANIFEST)
    for path in sorted(p for p in directory.iterdir() if not p.name.startswith(".") and p.name != MANIFEST):
        entry = recorded(path) if entries else None
        if path.is_dir():
            if entries and entry is None:
                continue  # not a weights dir (a re-evaluation's output): nothing recorded, nothing read
            records.check_tree(path)
        elif path.suffix == ".jsonl":
            records.read_jsonl(path)
        elif path.suffix == ".json":
            records.read_json(path)


def _link_tree(source: Path, target: Path, skip: set[str] = frozenset()) -> None:
    """Hard links of every visible file under `source` at the same place under `target` (copies where the
    filesystem cannot link): published files are never written again, so sharing an inode is safe."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if any(part.startswith(".") for part in relative.parts) or (len(relative.parts) == 1 and path.name in skip):
            continue
        destination = target / relative
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:
            shutil.copy2(path, destination)


def _judged_evaluation(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The evaluation settings that change what is measured (not the verdict rule, the cache, the pace)."""
    kept = {k: v for k, v in evaluation.items() if k not in ("amplification", "cache_dir")}
    for name in ("judge", "coherence_judge"):
        if kept.get(name):
            kept[name] = _without_pace(kept[name])
    return kept


def _without_pace(endpoint: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in endpoint.items() if k not in _ENDPOINT_PACE}


def _file_values(data: Any) -> set[str]:
    """Strings in `data` that name existing files (a persona file, a seed file, a prompt bank)."""
    if isinstance(data, dict):
        return set().union(*(_file_values(v) for v in data.values())) if data else set()
    if isinstance(data, list):
        return set().union(*(_file_values(v) for v in data)) if data else set()
    if isinstance(data, str) and data.startswith("/") and Path(data).is_file():
        return {data}
    return set()
