"""Launching runs above builders.train: sweeps (specs x grid) through submitit."""
