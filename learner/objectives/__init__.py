"""The training objectives (grpo, nft, awm): their maths, batches and losses, looked up by name in registry.py."""
