"""The one enclave runtime, used by Infenclave serving and CalTrain alike: how a host process and
its enclave worker process talk, and how the host keeps a worker running.

Trust side by module (both: each side holds one end):
    frames.py     both     sans-I/O frame codec: bytes in -> `Frame` events; encode -> bytes
    arena.py      both     sealed memfd segments and the sender's arena for tensors (F-34)
    transport.py  both     `Channel`: frames over a Unix socket, segment fds passed (SCM_RIGHTS)
    rpc.py        both     `ChannelClient` (Futures; a reader thread or the host's event loop),
                           `serve_channel` (the worker's loop), ONE error <-> exception table
    errors.py     both     `ChannelError`, `ChannelClosed`
    heap.py       both     garbage-collector settings of a serving process (freeze the startup heap)
    enclave/      enclave  `ops.py`: the op registry (name -> handler, argument ranges, inline);
                           `main.py`: the worker main (hardening first, backend, registry, loop)
    spawn.py      host     start a worker by fd, by socket path, or under Gramine (`WorkerSpec`)
    handle.py     host     `EnclaveHandle` (calls, liveness ping, kill, respawn) and `Supervisor`
                           (restart a dead or hung worker)

Serving (`serve/worker.py`) and CalTrain (`train/enclave_worker.py`) only register their ops and
call `enclave.main.run_worker`; their hosts hold an `EnclaveHandle` and a `Supervisor`. Nothing
here knows about models or cryptography. docs/serving.md, "Enclave runtime", has the picture.
"""
