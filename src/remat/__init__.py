"""remat: least-memory gradient checkpointing for PyTorch.

The pipeline: capture (model -> graph with sizes and costs), solve (graph ->
plan), execute (plan -> module), measure.
"""

from remat.measure import StepMeasurement, default_loss, measure_step, track_memory

__all__ = ["StepMeasurement", "default_loss", "measure_step", "track_memory"]
__version__ = "0.1.0"
