"""Rollout side: sampling, model adapters, prompt sources."""
