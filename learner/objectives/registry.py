"""The objectives by name: the one place that maps `learner.objective` to its class, and the config check that comes
with choosing one."""

from __future__ import annotations

from cluster.config import ConfigError, JobConfig
from learner.objectives.awm import Awm
from learner.objectives.base import Objective
from learner.objectives.grpo import Grpo
from learner.objectives.nft import Nft

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (Grpo, Nft, Awm)}


def objective_class(name: str) -> type[Objective]:
    """The class of an objective name; ConfigError listing the names when there is none."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ConfigError([f"learner.objective = {name!r}: no such objective; allowed: "
                           f"{', '.join(OBJECTIVES)}"]) from None


def objective_for(cfg: JobConfig) -> Objective:
    """The job's objective, after checking the config relations it needs (ConfigError, one line per problem)."""
    cls = objective_class(cfg.learner.objective)
    problems = cls.problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cls(cfg)
