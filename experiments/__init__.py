"""Experiment scripts: one per figure, each with a frozen Config, JSON results and a plotter."""
