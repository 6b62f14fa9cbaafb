"""Learner side: the driver process (driver/), the learner ranks (ranks/) and the objectives (objectives/); the entry
point is python -m learner.main."""
