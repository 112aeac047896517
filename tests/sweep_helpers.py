"""Helpers for sweep tests: small sweep files on the tiny model, W&B's offline run files read back, and Ray
instances the tests start and stop themselves (never one a user has running on the machine)."""

import struct
from pathlib import Path

import psutil
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
    """History rows (the cycles'; the optimizer steps' loss rows apart, as `steps`), summary, run metadata
    and logged artifacts of every offline run file with this id, in order."""
    import json

    history, steps, summary, meta, artifacts = [], [], {}, {}, []
    for run_file in sorted(storage_sweep_dir.glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb")):
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                (steps if "train/step" in row else history).append(row)
            elif kind == "artifact" and record.artifact.type != "run_table":  # a logged table's own artifact
                artifacts.append(record.artifact)
            elif kind == "summary":
                for item in record.summary.update:
                    summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "run":
                meta = {"group": record.run.run_group, "name": record.run.display_name, "tags": list(record.run.tags)}
    return {"history": history, "steps": steps, "summary": summary, "meta": meta, "artifacts": artifacts}


def start_local_ray() -> None:
    """A new local Ray instance with 2 fake GPUs (Ray only counts them); address 'local' never joins a
    cluster a user has running on the machine."""
    import ray

    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and everything it started (a sweep driver and the local Ray it brought up)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def ray_cluster_processes(temp_dir: Path) -> list[psutil.Process]:
    """The processes of the Ray cluster that `ray start --temp-dir=temp_dir` started, with their workers."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        if any(str(temp_dir) in part for part in process.info["cmdline"] or ()):
            found.update({p.pid: p for p in process_tree(process.pid)})
    return list(found.values())


def stop_processes(processes: list[psutil.Process], timeout: float = 30) -> None:
    """End exactly these processes: SIGTERM, then SIGKILL for whatever is still there after `timeout`."""
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
