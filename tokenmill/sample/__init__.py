"""Batched sampling: penalties, logit bias, masks, temperature, top-k/top-p/min-p, seeds."""
