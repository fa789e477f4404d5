"""Ablation sweeps over any config key of any recipe (Ray Tune), and the report built from their results."""
