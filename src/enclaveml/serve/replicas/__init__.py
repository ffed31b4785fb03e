"""`enclaveml serve --replicas N`: N host servers, each with its own attested enclave, as one Ray
Serve deployment (host side). Ray places, health-checks, restarts and autoscales the replicas;
clients reach the replicas directly (docs/scaling.md says why). Needs the `replicas` extra (ray[serve]).
"""
