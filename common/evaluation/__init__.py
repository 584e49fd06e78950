"""Evaluating a model as its owner must before using it (`fedtune evaluate`): task metrics,
per-group fairness gaps, robustness to perturbed inputs, and latency. No Flower."""
