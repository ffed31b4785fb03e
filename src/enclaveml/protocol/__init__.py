"""Typed messages shared by client, host and enclave: pure functions, no I/O, no HTTP.

Trust side: all. One module per conversation:
    identity  deployments addressed by owner and name; a client's pin of a model in each request
    attest    the evidence answer (an enclave's key bound to the asker's nonce)
    infer     inference requests and sealed answers (`InferRequest`, `InferResult` and their codec)
    deploy    the owner-signed upload header and the multi-part body of a deployment
    caltrain  CalTrain's contribute / start / release / audit envelopes
Routes (`serve/app.py`, `train/host.py`), sockets and processes only move these bytes; a
tampered-message test needs no server.
"""

from .identity import (ModelIdentity, ModelPin, ModelRef, Target, check_identity, check_model_id, check_name,
                       check_owner_hex, decode_identity, encode_identity, frame_target, identity_aad, infer_aad,
                       split_target)

__all__ = ["ModelIdentity", "ModelPin", "ModelRef", "Target", "check_identity", "check_model_id", "check_name",
           "check_owner_hex", "decode_identity", "encode_identity", "frame_target", "identity_aad", "infer_aad",
           "split_target"]
