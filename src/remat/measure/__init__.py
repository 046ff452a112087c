"""Measure: exact storage counts at the dispatcher, FLOPs, and whole training steps."""

from remat.measure.flops import flop_formula
from remat.measure.step import StepMeasurement, default_loss, measure_step
from remat.measure.tracker import MemoryTracker, track_memory

__all__ = ["MemoryTracker", "StepMeasurement", "default_loss", "flop_formula", "measure_step", "track_memory"]
