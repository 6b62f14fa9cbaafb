"""The driver process of a job: its loop, pools, evaluation, reports and checks (run by python -m learner.main)."""
