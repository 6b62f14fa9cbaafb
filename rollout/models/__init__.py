"""How a model is driven: the adapter contract, one adapter per family, schedules, loading, and the offline
tiny-model builder."""
