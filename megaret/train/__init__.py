"""The training engine: stage modules + DeepSpeed ZeRO, megatron-core schedules, metrics.

    python -m megaret.train --config configs/tiny.yaml [section.key=value ...]
"""
