"""Infenclave serving: the untrusted host server, the enclave worker and the channel between them.

Trust sides, by module: `app`, `batcher`, `store`, `metrics`, `host` run in the host (untrusted);
`worker` and `enclave` run in the enclave process; `channel` and `protocol` are used by both.
"""
