"""Inference library: loading a model (loading), decoding with carried state (decoding) and
streamed long-context perplexity (perplexity). The entry points are megaret/generate.py and
megaret/evaluate.py."""
