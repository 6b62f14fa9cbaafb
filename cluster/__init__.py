"""Cluster side: the job config, Ray start-up and pool placement, metrics wiring."""
