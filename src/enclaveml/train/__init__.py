"""CalTrain: accountable confidential training (participants, training enclave, host, owner).

Layout by trust side: `instances` (participant signs, enclave verifies and seals), `partitioned`
(EnclaveTrainer runs in the enclave, HostTrainer on the host), `fingerprint`, `linkage`, `trace`,
`detectors` (pure logic used by the enclave and the owner), `enclave_worker` (the enclave process),
`host` (the untrusted HTTP server), `participant` and `owner` (clients). See docs/caltrain.md.
"""
