"""Execute: run a plan as a drop-in module, with exact gradients, on one segment engine."""

from remat.execute.compiled import CompiledModule
from remat.execute.module import RematModule
from remat.execute.offload import CheckpointOffload
from remat.execute.remake import remake_cheap
from remat.execute.shapes import PerShapeModule
from remat.execute.sequential import CheckpointedSequential

__all__ = ["CheckpointOffload", "CompiledModule", "CheckpointedSequential", "PerShapeModule", "RematModule", "remake_cheap"]
