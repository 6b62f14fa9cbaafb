"""Reward scorers behind one contract, and the reward-service actor pool."""
