"""Model Assessment Framework: where to partition a model, measured (owner side).

KL test (the paper's dual network), decoder and rMLE inversion attacks, FrontNet cost and the
recommended partition point; `run_assessment` returns assessment.json's record, `report` renders it.
"""

from .config import AssessConfig, SGX1_EPC_BYTES
from .runner import Assessment, run_assessment

__all__ = ["AssessConfig", "SGX1_EPC_BYTES", "Assessment", "run_assessment"]
