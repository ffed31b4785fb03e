"""Typed messages shared by client, host and enclave: pure functions, no I/O.

Trust side: all. `identity` addresses deployments by owner and name and carries a client's pin of
a model into each request; the inference wire formats are in `enclaveml.serve.protocol` for now.
"""

from .identity import (ModelIdentity, ModelPin, ModelRef, Target, check_identity, check_name, check_owner_hex,
                       decode_identity, encode_identity, frame_target, identity_aad, infer_aad, split_target)

__all__ = ["ModelIdentity", "ModelPin", "ModelRef", "Target", "check_identity", "check_name", "check_owner_hex",
           "decode_identity", "encode_identity", "frame_target", "identity_aad", "infer_aad", "split_target"]
