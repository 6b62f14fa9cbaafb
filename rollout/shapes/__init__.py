"""The synthetic shapes world of the CPU micro-benchmark: its data and the builder of its base model."""
