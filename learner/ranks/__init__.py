"""The learner ranks: one Ray actor per rank running DeepSpeed on the transformer, with its checkpoints, EMA and lr."""
