"""Evaluation: a checkpoint's data rebuilt, every exit's metric, sweeps, calibrated tables, separation, plots."""
