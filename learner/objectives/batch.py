"""An iteration's batch as every objective takes it (no Ray, no DeepSpeed): sorted groups, advantages, and the split
into updates, ranks and micro-batches.

An iteration's batch is its scored groups sorted by `group_id`, planned from their `RecordSummary`s (or the records,
which answer the same questions); a sample is `(position of its group, index in the
group)` and the batch order is by (group_id, index). `update_plan` splits that order into the iteration's optimizer
updates **round-robin** (sample number i of the order goes to update i mod U, so each update sees part of every group),
then each update's samples, still in order, into consecutive micro-batches: rank r takes micro-batches r·M … r·M+M−1.
With one update, one rank and a micro-batch size equal to the rollout's `samples_per_forward` (dividing the group
size), every micro-batch is exactly one rollout chunk, so the recomputed log-probs equal the recorded ones bit for bit.
What a micro-batch holds is the objective's: recorded steps (learner/objectives/grpo.py) or final samples
(learner/objectives/final_samples.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from learner.objectives.grpo_math import advantages as grpo_advantages
from rollout.models.contract import PromptEmbeds
from rollout.sampling.trajectory import FinalSamples, RecordSummary, Trajectories

SampleRef = tuple[int, int]  # (position of the group in the sorted batch, sample index within the group)


def _float64(rewards: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """One group's rewards as a 1-D float64 tensor (a copy: arrays that came through Ray are read-only)."""
    if isinstance(rewards, torch.Tensor):
        return rewards.detach().to(torch.float64).reshape(-1)
    return torch.from_numpy(np.array(rewards, dtype=np.float64)).reshape(-1)


Group = Trajectories | FinalSamples | RecordSummary  # what a plan reads: group_id, group_size, settings, sigmas


def sort_batch(
    groups: Sequence[Group], rewards: Sequence[Sequence[float] | torch.Tensor], trained_steps: int
) -> tuple[list[Group], list[torch.Tensor]]:
    """Groups and their (G,) rewards sorted by group_id, checked to be one consistent batch of `trained_steps` steps."""
    if len(groups) != len(rewards):
        raise ValueError(f"{len(groups)} groups but {len(rewards)} reward arrays: one (G,) array per group")
    if not groups:
        raise ValueError("a training iteration needs at least one scored group")
    ids = [g.group_id for g in groups]
    if len(set(ids)) != len(ids):
        raise ValueError(f"group ids repeat in one iteration: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    order = sorted(range(len(groups)), key=lambda i: ids[i])
    groups = [groups[i] for i in order]
    rewards = [_float64(rewards[i]) for i in order]
    first = groups[0]
    for g, r in zip(groups, rewards):
        if r.numel() != g.group_size:
            raise ValueError(f"group {g.group_id}: {r.numel()} rewards for {g.group_size} samples")
        if not torch.isfinite(r).all():
            raise ValueError(f"group {g.group_id}: non-finite rewards {r.tolist()} (a failed score drops the group)")
        if type(g) is not type(first):
            raise ValueError(f"group {g.group_id} is a {type(g).__name__}, group {first.group_id} a "
                             f"{type(first).__name__}: one iteration holds one kind of rollout")
        if g.settings.record_steps and g.num_recorded_steps != trained_steps:
            raise ValueError(f"group {g.group_id} records {g.num_recorded_steps} steps but the learner trains "
                             f"{trained_steps} per trajectory (cfg.trained_steps); rollout and learner configs differ")
        if g.settings != first.settings or not torch.equal(torch.as_tensor(g.sigmas), torch.as_tensor(first.sigmas)):
            raise ValueError(f"group {g.group_id} was sampled with other settings or sigmas than group "
                             f"{first.group_id}: one iteration must share one sampler configuration")
    return groups, rewards


def sample_order(groups: Sequence[Group]) -> list[SampleRef]:
    """Every sample of the (sorted) batch as (group position, index), in (group_id, index) order."""
    return [(g, i) for g, group in enumerate(groups) for i in range(group.group_size)]


def batch_advantages(
    groups: Sequence[Group], rewards: Sequence[torch.Tensor], *, std: str, clip: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages (float32, in `sample_order`) and their statistics: mean, std, fraction of zero-std groups."""
    flat = torch.cat(list(rewards))
    ids = torch.cat([torch.full((g.group_size,), g.group_id, dtype=torch.long) for g in groups])
    adv = grpo_advantages(flat, ids, std=std, clip=clip).to(torch.float32)
    zero_std = sum(bool((r == r[0]).all()) for r in rewards)
    stats = {
        "advantage_mean": float(adv.mean()),
        "advantage_std": float(adv.std(correction=0)),
        "zero_std_group_frac": zero_std / len(groups),
        "reward_mean": float(flat.mean()),
        "reward_std": float(flat.std(correction=0)),
    }
    return adv, stats


def _even_split(items: list[int], parts: int) -> list[list[int]]:
    """`items` in order cut into `parts` consecutive runs whose sizes differ by at most one (larger ones first)."""
    size, extra = divmod(len(items), parts)
    runs, start = [], 0
    for p in range(parts):
        stop = start + size + (p < extra)
        runs.append(items[start:stop])
        start = stop
    return runs


def update_plan(
    num_samples: int,
    *,
    num_updates: int,
    num_ranks: int,
    micro_batches: int,
    keep: torch.Tensor | None = None,
) -> list[list[list[list[int]]]]:
    """plan[u][r][m]: positions (in `sample_order`) of micro-batch m of rank r in update u.

    The kept samples (all, or the positions `keep` lists in order) go to the updates round-robin; each update's
    samples are cut in order into one consecutive run per rank, and each run into `micro_batches` consecutive
    micro-batches, all of near-equal size. The micro-batch count is fixed (DeepSpeed's accumulation count is fixed
    at init), so every micro-batch must hold at least one sample.
    """
    order = list(range(num_samples)) if keep is None else torch.as_tensor(keep).reshape(-1).tolist()
    needed = num_updates * num_ranks * micro_batches
    if len(order) < needed:
        raise ValueError(
            f"{len(order)} samples cannot fill {num_updates} update(s) x {num_ranks} rank(s) x {micro_batches} "
            f"micro-batch(es); an iteration needs at least {needed} samples"
        )
    return [[_even_split(share, micro_batches) for share in _even_split(order[u::num_updates], num_ranks)]
            for u in range(num_updates)]


def groups_of_rank(plan: list[list[list[list[int]]]], samples: Sequence[SampleRef], rank: int) -> list[int]:
    """The positions of the groups that rank `rank` trains samples of in any update of `plan`: the records it
    fetches (a consecutive run of the batch order, so about 1/ranks of the groups)."""
    return sorted({samples[i][0] for update in plan for positions in update[rank] for i in positions})


def samples_embeds(groups: Sequence[Trajectories | FinalSamples], samples: Sequence[SampleRef]) -> PromptEmbeds:
    """The prompt embeddings of a micro-batch: the group's one row when all samples share a group, else one row per
    sample."""
    if not samples:
        raise ValueError("a micro-batch needs at least one sample")
    positions = {g for g, _ in samples}
    if len(positions) == 1:
        return groups[positions.pop()].prompt_embeds
    return PromptEmbeds.cat([groups[g].prompt_embeds for g, _ in samples])
