"""How a step is taken: the step rules and their log-probs, the sampling loop, the forward that sampling and training
share, and the trajectory record."""
