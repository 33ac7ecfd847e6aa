"""Launching runs: planning (layout, parameters, memory) and SLURM / local submission."""
