"""A trial's place on a Ray cluster: its placement group's bundles and what each one is for.

    bundle 0                 the trial's driver (the Tune function), and on CPUs its engines too
    bundle 1 (with GPUs)     the engines: M_init, the policy, the sampler, the trainer's first rank
    then one bundle a rank   DeepSpeed training ranks beyond the first, one GPU each

The sweep builds it from the trial's resources, Tune reserves the bundles, and the trial hands it to the
actors that use them (the engines, the training ranks), which ask it where to go.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class TrialPlacement:
    bundles: list[dict[str, float]]
    engines: int = 0  # the bundle of the engines
    ranks: tuple[int, ...] = ()  # the bundle of each training rank that runs as an actor of its own
    group: Any = field(default=None, compare=False)  # the reserved Ray placement group, once there is one

    @classmethod
    def for_trial(cls, cpus: float, gpus: float, training_ranks: int = 0) -> TrialPlacement:
        """The driver alone on CPUs, or driver + engine bundle with the GPUs; then one single-GPU bundle per
        DeepSpeed training rank that runs as an actor of its own."""
        ranks = [{"CPU": 1.0, "GPU": 1.0}] * training_ranks
        if gpus == 0:
            return cls([{"CPU": cpus}, *ranks], 0, tuple(range(1, 1 + training_ranks)))
        return cls([{"CPU": 1.0}, {"CPU": cpus, "GPU": gpus}, *ranks], 1, tuple(range(2, 2 + training_ranks)))

    def reserved(self) -> TrialPlacement:
        """This placement with the group the current Ray task runs in (inside a Tune trial)."""
        import ray

        return replace(self, group=ray.util.get_current_placement_group())

    def options(self, bundle: int, **resources: float) -> dict[str, Any]:
        """Ray options that put an actor or task with `resources` into `bundle` of the reserved group (anywhere
        with free resources when there is none: `idempo run`)."""
        if self.group is None:
            return resources
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=bundle)
        return {**resources, "scheduling_strategy": strategy}

    def rank(self, rank: int) -> dict[str, Any]:
        """Where training rank `rank` runs (one GPU)."""
        return self.options(self.ranks[rank] if self.group is not None else 0, num_cpus=1, num_gpus=1)


UNPLACED = TrialPlacement([])  # `idempo run`: actors go wherever Ray finds room
