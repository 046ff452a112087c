"""remat: least-memory gradient checkpointing for PyTorch.

The pipeline: capture (model -> graph with sizes and costs), solve (graph ->
plan), execute (plan -> module), measure.
"""

from remat.api import max_batch, optimize, pareto, plan
from remat.budget import InfeasibleBudget, parse_bytes
from remat.capture.graph import TraceError
from remat.execute.compiled import CompiledModule
from remat.execute.module import RematModule
from remat.execute.offload import CheckpointOffload
from remat.execute.sequential import CheckpointedSequential
from remat.execute.shapes import PerShapeModule
from remat.measure.step import StepMeasurement, default_loss, measure_step
from remat.measure.tracker import track_memory
from remat.plan import Plan
from remat.execute.remake import remake_cheap

__all__ = [
    "CheckpointOffload",
    "CheckpointedSequential",
    "CompiledModule",
    "InfeasibleBudget",
    "PerShapeModule",
    "Plan",
    "RematModule",
    "StepMeasurement",
    "TraceError",
    "default_loss",
    "max_batch",
    "measure_step",
    "optimize",
    "pareto",
    "parse_bytes",
    "plan",
    "remake_cheap",
    "track_memory",
]
__version__ = "0.1.0"
