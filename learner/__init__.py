"""Learner side: GRPO maths, the DeepSpeed learner group, checkpoints and the driver (python -m learner.main)."""
