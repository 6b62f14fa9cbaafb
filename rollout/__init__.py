"""The rollout side: the Ray worker, its pool and the weight transport here; the wings `sampling/`, `models/`,
`prompts/` and `shapes/` below."""
