"""enclaveml: confidential deep learning with enclave-partitioned models.

Owner side: ``enclaveml.assess`` (where to split), ``enclaveml.models`` (how to split).
Host side: ``enclaveml.serve`` (untrusted server). Enclave side: the worker in ``enclaveml.serve``
and ``enclaveml.train``. Pure protocol code: ``enclaveml.crypto`` and ``enclaveml.tee``.
"""

__version__ = "0.1.0"
