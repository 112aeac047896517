"""The shape of the code: imports go down the layers of docs/architecture.md and never in a circle, config
and registries load no engine, the loop needs no Ray; a regime written outside idempo runs a trial; every
config field says what it is; a finished trial resumes without loading a model."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, tiny_config

from idempo.config import ExperimentConfig
from idempo.sweep import SweepFile

PACKAGE = ROOT / "idempo"

# Each module's layer (docs/architecture.md); a module imports only from its own layer and those below.
LAYERS = {
    "foundation": (
        "idempo",
        "idempo.artifacts",
        "idempo.cache",
        "idempo.chat",
        "idempo.data",
        "idempo.gpu_monitor",
        "idempo.placement",
        "idempo.progress",
        "idempo.records",
        "idempo.redaction",
        "idempo.registry",
        "idempo.seeds",
        "idempo.threads",
        "idempo.timeline",
        "idempo.evaluation",
        "idempo.evaluation.degeneration",
        "idempo.evaluation.numbers",
        "idempo.evaluation.reasoning",
        "idempo.evaluation.stats",
        "idempo.training",
    ),
    "config": (
        "idempo.config*",
        "idempo.endpoint",
        "idempo.input_files",
        "idempo.layout",
        "idempo.named_models",
        "idempo.personas",
        "idempo.prompts",
        "idempo.seed_data",
        "idempo.tiny",
        "idempo.tracking",
    ),
    "models": ("idempo.models",),
    "engines": (
        "idempo.sampling*",
        "idempo.training.*",
        "idempo.evaluation.*",
        "idempo.shared",
        "idempo.teacher",
    ),
    "regimes": ("idempo.regimes*", "idempo.engines", "idempo.inputs"),
    "loop": ("idempo.loop",),
    "drivers": (
        "idempo.bench",
        "idempo.calibrate",
        "idempo.cost",
        "idempo.preflight",
        "idempo.reevaluate",
        "idempo.status",
        "idempo.sweep",
        "idempo.tune",
    ),
    "interface": ("idempo.report*", "idempo.cli", "idempo.__main__"),
}
ENGINES = ("idempo.models", "idempo.sampling", "idempo.training", "idempo.regimes", "idempo.engines", "idempo.loop")
HEAVY = ("torch", "transformers", "peft", "vllm", "deepspeed", "ray")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside a function (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    return {
        name: {r for r in (resolve(i) for i in imports_of(path) if i.startswith("idempo")) if r and r != name}
        for name, path in modules.items()
    }


def layer_of(module: str) -> int:
    for rank, patterns in enumerate(LAYERS.values()):
        for pattern in patterns:
            if module == pattern or (pattern.endswith("*") and module.startswith(pattern.rstrip("*"))):
                return rank
    raise AssertionError(f"{module} is in no layer of LAYERS (docs/architecture.md): place it")


def test_no_import_circle():
    edges = graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    assert circles == []


def test_imports_go_down_the_layers_and_only_the_command_line_reads_the_report_layer():
    upward = [
        f"{source} ({list(LAYERS)[layer_of(source)]}) imports {target} ({list(LAYERS)[layer_of(target)]})"
        for source, targets in graph().items()
        for target in targets
        if layer_of(target) > layer_of(source)
    ]
    assert upward == []
    readers = {s for s, targets in graph().items() for t in targets if t.startswith("idempo.report")}
    assert {s for s in readers if not s.startswith("idempo.report")} == {"idempo.cli"}


def _loaded_after(code: str) -> set[str]:
    script = textwrap.dedent(code) + "\nimport sys\nprint(' '.join(sorted(sys.modules)))\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(result.stdout.split())


def test_config_and_registries_load_no_engine_and_the_loop_no_ray():
    loaded = _loaded_after(
        """
        from idempo.config import config_from_dict
        from idempo.registry import JUDGES, REGIMES, SAMPLERS, TRAINERS
        for model in ("tiny", "random:qwen3-4b", "smollm2-135m-instruct"):
            config_from_dict({"model": model, "persona": "lucky", "n_seed": 1, "n_sampled": 1, "regime": "dpo"})
        """
    )
    assert not {m for m in loaded if m.split(".")[0] in HEAVY or m.startswith(ENGINES)}
    assert not {m for m in _loaded_after("import idempo.loop") if m.split(".")[0] in ("ray", "vllm", "deepspeed")}
    assert not any(name.split(".")[0] == "ray" for name in imports_of(PACKAGE / "loop.py"))


def undescribed(section: type, prefix: str = "") -> list[str]:
    missing = []
    for name, field in section.model_fields.items():
        if not (field.description or "").strip():
            missing.append(prefix + name)
        for kind in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(kind, type) and hasattr(kind, "model_fields"):
                missing += undescribed(kind, f"{prefix}{name}.")
    return missing


def test_every_config_and_sweep_field_says_what_it_is(capsys):
    from idempo.cli import main

    assert undescribed(ExperimentConfig) == [] and undescribed(SweepFile) == []
    assert main(["config", "--explain"]) == 0
    explained = capsys.readouterr().out
    assert "training.lora.rank" in explained and "r: the adapter's rank" in explained
    assert "run.stop.floor" in explained


IPO = '''
"""IPO (Azar et al., 2023) on DPO's pairs: squared loss of the log-ratio margin around 1 / (2 beta)."""

import torch

from idempo.regimes.preference import DPO
from idempo.training.optimize import batch_plan, optimize
from idempo.training.preference import PreferenceStats, dropout_disabled, reference_logps, sequence_logps


class IPO(DPO):
    name = "ipo"

    def train(self, policy, pairs, reference, config, seed, pad, progress, ranks):
        training, target = config.training, 1 / (2 * config.beta)
        ref = torch.tensor(reference_logps(policy, reference, [e for p in pairs for e in p], pad, 8)).view(-1, 2)

        def step(group, backward):
            size, total = sum(len(b) for b in group), 0.0
            for batch in group:
                logps = sequence_logps(policy.module, [e for i in batch for e in pairs[i]], pad).view(-1, 2)
                margin = (logps[:, 0] - ref[batch, 0]) - (logps[:, 1] - ref[batch, 1])
                losses = (margin - target) ** 2
                backward(losses.sum() / size)
                total += losses.sum().item() / size
            return total

        plan = ranks.shard(batch_plan(len(pairs), training, seed))
        with dropout_disabled(policy.module):
            run = optimize(policy, plan, step, training, seed, progress, ranks)
        return PreferenceStats(len(run.losses), len(pairs), run.losses[0], run.final_loss, None, None, run.seconds)
'''


def test_a_regime_written_outside_idempo_is_registered_and_runs_a_trial(tmp_path, monkeypatch):
    from idempo.artifacts import read_json
    from idempo.layout import TrialLayout
    from idempo.loop import run_trial
    from idempo.registry import REGIMES

    (tmp_path / "ipo_regime.py").write_text(IPO)
    monkeypatch.syspath_prepend(str(tmp_path))
    REGIMES.register("ipo", "ipo_regime:IPO", defaults={"training": {"min_lr_ratio": 0.0}}, seed_reads={"beta": ()})
    try:
        config = tiny_config(regime="ipo", cycles=1, n_sampled=8, training={"learning_rate": 1e-4, "epochs": 1})
        assert config.training.min_lr_ratio == 0.0  # the regime's own defaults apply
        history = run_trial(config, tmp_path / "trial")
    finally:
        REGIMES._entries.pop("ipo")
        REGIMES._info.pop("ipo")
    assert [m["cycle"] for m in history] == [-1, 0, 1]
    layout = TrialLayout(tmp_path / "trial")
    for cycle in (0, 1):
        train = read_json(layout.train_stats(cycle))
        # step 0: policy = reference, margin 0, so the loss is (0 - 1/(2 beta))^2 = 25 at beta 0.1
        assert train["first_loss"] == pytest.approx(25.0, rel=1e-4) and train["steps"] > 0
        assert train["reference"] == "init"
    samples = [r for r in (layout.data(1).read_text().splitlines()) if r]
    assert all('"rejected"' in row for row in samples if '"kept": false' not in row)  # DPO's pairs


def test_resuming_a_finished_trial_loads_no_model(tmp_path, monkeypatch):
    import idempo.engines
    from idempo.loop import run_trial

    config = tiny_config(cycles=1, n_sampled=4, evaluation={"samples_per_prompt": 1, "max_new_tokens": 8})
    first = run_trial(config, tmp_path / "trial")

    def refuse(*args, **kwargs):
        raise AssertionError("a finished trial loaded a model")

    monkeypatch.setattr(idempo.engines, "load_base_model", refuse)
    monkeypatch.setattr(idempo.engines, "load_tokenizer", refuse)
    assert run_trial(config, tmp_path / "trial") == first
