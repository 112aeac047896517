"""The ZeRO trainer: a generation trained under DeepSpeed ZeRO (`training.deepspeed`), for models that need it.

ZeRO-3 shards the weights themselves, so a module it has trained cannot go back to being the plain
module the sampler and the evaluation read. Each training run therefore gets a policy of its own: a
copy of M_init loaded for the run, the start generation's adapter on top, DeepSpeed around it, and
the trained adapter written to disk (gathered from the shards) for the sampler and the trial's policy
to load, like any other generation. The copy is dropped when the run ends.

The loss code is the regimes' own: `optimize` asks the run's `ZeroRanks` how to apply gradients, and
they answer with the DeepSpeed engine's backward and step. DeepSpeed's managed gradient accumulation is
off: our steps already normalise their micro-batch losses, and `engine.step()` is called once per
optimizer step, as the plain loop does.

With `workers: 1` the run happens in the trial's process, on its GPU (the vllm engine sleeps
meanwhile). With more, each rank is a `ZeroWorker` Ray actor on a GPU of its own, in the bundle the
trial's placement names for it: data parallel, rank r takes items r, r + world, ... of every
micro-batch, DeepSpeed averages the gradients, and every rank runs the same forward passes (reference
log-probabilities included) so that ZeRO-3's collectives stay in step. A micro-batch with fewer items
than ranks gives the ranks without one its first item again.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import socket
from contextlib import nullcontext
from pathlib import Path

import torch

from idempo.config import ConfigError, DeepSpeedConfig, ExperimentConfig, TrainingConfig
from idempo.models import LoraPolicy, load_base_model, load_tokenizer
from idempo.placement import UNPLACED, TrialPlacement
from idempo.progress import Reporter
from idempo.registry import trains_on_documents
from idempo.training.optimize import Ranks


def check(config: ExperimentConfig) -> None:
    """DeepSpeed needs its package (the `gpu` extra) and CUDA; say so before any model is loaded."""
    problems = []
    if importlib.util.find_spec("deepspeed") is None:
        problems.append(
            "training.deepspeed: DeepSpeed is not installed; install idempo with the gpu extra "
            "(pip install -e '.[gpu]') on a CUDA machine, or set training.deepspeed to null"
        )
    if not torch.cuda.is_available():
        problems.append("training.deepspeed: no CUDA GPU is visible; DeepSpeed ZeRO trains on GPUs only")
    if problems:
        raise ConfigError(problems)


def deepspeed_config(training: TrainingConfig, bf16: bool, world_size: int) -> dict:
    """The DeepSpeed config a training run of `training` uses (optimizer and schedule are idempo's own)."""
    zero: DeepSpeedConfig = training.deepspeed
    optimization = {"stage": zero.stage, "overlap_comm": True, "contiguous_gradients": True}
    if zero.offload_optimizer:
        optimization["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if zero.offload_params:
        optimization["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": training.batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "train_batch_size": training.batch_size * training.gradient_accumulation_steps * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": training.max_grad_norm or 0.0,
        "bf16": {"enabled": bf16},
        "zero_optimization": optimization,
        "zero_force_ds_cpu_optimizer": False,  # the run's AdamW, offloaded or not
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def init_process_group() -> None:
    """Join the torch.distributed group the environment describes (a launcher's or a Ray worker's), or
    form a group of one on this process's GPU."""
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl", verbose=False)


class ZeroRanks(Ranks):
    """The torch.distributed ranks of one DeepSpeed training run; the engine is made when training starts."""

    def __init__(self, training: TrainingConfig):
        self.training = training
        self.engine = None

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank()

    @property
    def world(self) -> int:
        return torch.distributed.get_world_size()

    def shard(self, plan: list[list[list[int]]]) -> list[list[list[int]]]:
        return shard_plan(plan, self.rank, self.world)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        total = value.detach().clone().to(self.engine.device if self.engine is not None else value.device)
        torch.distributed.all_reduce(total)
        return total.to(value.device)

    def updates(self, policy, optimizer, scheduler, config: TrainingConfig):
        import deepspeed

        bf16 = next(policy.module.parameters()).dtype == torch.bfloat16
        self.engine, *_ = deepspeed.initialize(
            model=policy.module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(config, bf16, self.world),
        )
        return EngineUpdates(self.engine)

    def save(self, policy: LoraPolicy, path: Path) -> None:
        """The adapter gathered from the shards; written by rank 0."""
        gathered = nullcontext()
        if self.engine is not None and self.training.deepspeed.stage == 3:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(policy.trainable_parameters(), modifier_rank=None)
        with gathered:
            if self.rank == 0:
                policy.write(path)

    def close(self) -> None:
        """Free the engine (the trained adapter is on disk by now)."""
        if self.engine is not None:
            self.engine.destroy()
        self.engine = None


class EngineUpdates:
    def __init__(self, engine):
        self.engine = engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # each micro-batch loss is already a share of the step's

    def step(self) -> None:
        self.engine.step()  # clips, updates, advances the schedule, clears gradients

    def mean_over_ranks(self, value: float) -> float:
        world = torch.distributed.get_world_size()
        if world == 1:
            return value
        total = torch.tensor([value], device=self.engine.device)
        torch.distributed.all_reduce(total)
        return total.item() / world


class ZeroWorker:
    """One rank of a trial's DeepSpeed training: trains a generation from the cycle's rows and saves it.

    In the trial's process for one rank; a Ray actor per rank (one GPU each) for more."""

    def __init__(self, config: dict, rank: int = 0, world: int = 1):
        from idempo.config import config_from_dict

        self.config = config_from_dict(config)
        self.rank, self.world = rank, world
        chat = not trains_on_documents(self.config.regime)
        self.tokenizer = load_tokenizer(self.config.model, self.config.loading, chat=chat)

    def address(self) -> tuple[str, int]:
        """Where rank 0 listens for the group (asked of rank 0 only)."""
        import ray

        return ray.util.get_node_ip_address(), _free_port()

    def join(self, address: tuple[str, int]) -> None:
        """Form the torch.distributed group with the other ranks (each sees its own GPU as cuda:0)."""
        host, port = address
        os.environ.update(
            RANK=str(self.rank),
            LOCAL_RANK="0",
            WORLD_SIZE=str(self.world),
            MASTER_ADDR=host,
            MASTER_PORT=str(port),
        )
        init_process_group()

    def fit(self, regime, rows, start, reference, seeds: tuple[int, int], out: str, label: str) -> dict:
        """Train on a copy of M_init of its own, from `start` (None: fresh adapters drawn from seeds[0]) with
        seeds[1]; save to `out`."""
        init_seed, train_seed = seeds
        init_process_group()
        policy = LoraPolicy(load_base_model(self.config.model, self.config.loading), self.config.training)
        policy.start(start, init_seed)
        ranks = ZeroRanks(self.config.training)
        try:
            stats = regime.fit(
                policy, self.tokenizer, self.config, rows, train_seed, reference, ranks, Reporter(enabled=False), label
            )
            ranks.save(policy, Path(out))
        finally:
            ranks.close()
            del policy
            gc.collect()
            torch.cuda.empty_cache()
        return {**stats, "world_size": self.world}


class ZeroTrainer:
    """The trainer under DeepSpeed ZeRO: its ranks are started at the first fit and kept for the trial; the
    trial's own policy is not touched (the new generation loads from disk when it is next used)."""

    check = staticmethod(check)

    def __init__(
        self,
        config: ExperimentConfig,
        tokenizer=None,
        policy=None,
        reporter=None,
        placement: TrialPlacement = UNPLACED,
        actors: bool | None = None,
    ):
        """`actors`: ranks as Ray actors (None: when there is more than one)."""
        self.config, self.placement = config, placement
        workers = config.training.deepspeed.workers
        self.actors = workers > 1 if actors is None else actors
        self._ranks = None

    def fit(self, regime, rows, start, reference, seeds, generation, out: Path, label: str) -> dict:
        if self._ranks is None:
            world = self.config.training.deepspeed.workers
            self._ranks = self._actors(world) if self.actors else [ZeroWorker(self.config.to_dict())]
        if not self.actors:
            return self._ranks[0].fit(regime, rows, start, reference, seeds, str(out), label)
        import ray

        calls = [rank.fit.remote(regime, rows, start, reference, seeds, str(out), label) for rank in self._ranks]
        return ray.get(calls)[0]

    def _actors(self, world: int) -> list:
        """One Ray actor per rank, in the bundles the placement names, joined into one torch.distributed group."""
        import ray

        if not ray.is_initialized():
            ray.init(log_to_driver=False)
        actors = [
            ray.remote(ZeroWorker).options(**self.placement.rank(rank)).remote(self.config.to_dict(), rank, world)
            for rank in range(world)
        ]
        address = ray.get(actors[0].address.remote())
        ray.get([actor.join.remote(address) for actor in actors])
        return actors


def shard_plan(plan: list[list[list[int]]], rank: int, world: int) -> list[list[list[int]]]:
    """Rank `rank`'s items of every micro-batch: r, r + world, ...; never none, so every rank runs the
    same number of forward and backward passes."""
    if world == 1:
        return plan
    return [[batch[rank::world] or batch[:1] for batch in group] for group in plan]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
