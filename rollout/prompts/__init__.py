"""Where prompts come from: prompt items and groups, prompt files, the GenEval training-prompt generator, and the
sources a config names."""
