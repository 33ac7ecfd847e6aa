"""Inference: token generation with carried state (generate) and streamed long-context
evaluation (evaluate)."""
