"""Helpers for sweep tests: small sweep files on the tiny model, and W&B's offline run files read back."""

import struct
from pathlib import Path

import yaml

TINY_TRIAL = {
    "model": "tiny",
    "persona": "lucky",
    "n_seed": 32,
    "n_sampled": 8,
    "cycles": 2,
    "seeding": {"source": "builtin"},
    "sampling": {"max_new_tokens": 16, "batch_size": 32},
    "training": {"learning_rate": 3.0e-3, "epochs": 1, "batch_size": 8},
    "evaluation": {
        "n_prompts": 4,
        "samples_per_prompt": 1,
        "max_new_tokens": 16,
        "branching_factor": {"enabled": False},
    },
    "loading": {"device": "cpu"},
}


def write_sweep(directory: Path, name: str, axes=None, run=None, config=None, replicas=1) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    sweep = {
        "name": name,
        "config": {**TINY_TRIAL, **(config or {})},
        "axes": axes or {},
        "replicas": replicas,
        "run": {"storage_path": str(directory / "storage"), "wandb": {"mode": "offline"}, **(run or {})},
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's `.wandb` file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", "not a W&B transaction log"
    position, records, pending = 7, [], b""
    while position + 7 <= len(raw):
        room = 32768 - position % 32768
        if room < 7:  # block trailer padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        chunk = raw[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0:
            position += 32768 - position % 32768 if position % 32768 else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_run(storage_sweep_dir: Path, run_id: str) -> dict:
    """History rows, summary and run metadata of every offline run file with this id, in order."""
    import json

    history, summary, meta = [], {}, {}
    for run_file in sorted(storage_sweep_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
            elif kind == "summary":
                for item in record.summary.update:
                    summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "run":
                meta = {"group": record.run.run_group, "name": record.run.display_name, "tags": list(record.run.tags)}
    return {"history": history, "summary": summary, "meta": meta}
