"""Model Assessment Framework: where to partition a model, measured (owner side).

KL test (the paper's dual network), decoder and rMLE inversion attacks, FrontNet cost and the
recommended partition point; `run_assessment` returns assessment.json's record, `report` renders it.
Calling the package, `enclaveml.assess(model, data, ...)`, runs the Python API's `assess`.
"""

import sys
import types

from .config import AssessConfig, SGX1_EPC_BYTES
from .runner import Assessment, run_assessment

__all__ = ["AssessConfig", "SGX1_EPC_BYTES", "Assessment", "run_assessment"]



class _CallablePackage(types.ModuleType):
    """This package, callable: `enclaveml.assess(model, data, ...)` is `enclaveml.api.assessment.assess`.

    Why: `enclaveml.assess` names both this package and the Python API's call, and the import
    system sets the package as that attribute when it is first imported; a callable package keeps
    both meanings, whatever is imported first.
    """

    def __call__(self, *args, **kwargs):
        from ..api.assessment import assess

        return assess(*args, **kwargs)

    @property
    def __signature__(self):  # what inspect.signature, IDEs and notebooks show for the call
        import inspect

        from ..api.assessment import assess

        return inspect.signature(assess)


sys.modules[__name__].__class__ = _CallablePackage
