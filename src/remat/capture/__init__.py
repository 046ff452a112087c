"""Capture: a model and example inputs -> a graph (or chain) with sizes and costs."""
