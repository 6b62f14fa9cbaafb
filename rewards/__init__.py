"""Reward scorers behind one contract, and the reward-service actor pool."""

from rewards.base import RewardInputError, Scorer, ScoreResult
from rewards.registry import build, registered

__all__ = ["RewardInputError", "ScoreResult", "Scorer", "build", "registered"]
