"""pdserve's KV-transfer layer: a vLLM KV connector with pluggable transports.

Design: **pull**. The prefill engine computes the prompt and one token; its connector keeps the
request's blocks (vLLM's delay-free) and returns a ``KvHandle`` (host, each tensor-parallel rank's
ports, request id, token count). Each rank's KV servers bind ports the OS picks when the engine
starts, and report them to the scheduler side through vLLM's connector handshake: no port is
chosen ahead and found taken at bind time. The router passes the handle to the decode instance it chose *after* the prefill; the
decode engine's connector claims the prompt tokens as an asynchronous external load, vLLM
allocates the blocks and parks the request, and a worker thread pulls the blocks from the
prefill's KV server straight into them with the transport the handle names (``transports``:
``tcp`` by default, ``grpc``, ``gloo``/NCCL), checksummed, then releases the sender's blocks.

Why pull rather than layer-wise push: (1) the receiver writes into blocks its own scheduler
allocated, so there is no staging buffer and no state for KV that arrives before its request;
(2) the decode instance is chosen from load measured after the prefill, when it is most recent;
(3) backpressure is natural: a decode engine without free blocks simply does not start the pull.
What it costs: the transfer does not overlap the prefill compute. It does not delay the first
token, which the router streams from the prefill result; it delays the second. At this model's
size on loopback the whole transfer takes milliseconds (see docs/).

Bounds: the sender frees blocks on release or when ``lease_s`` expires (never under a pull in
flight); the router renews the lease while the decode is queued and owns the KV until the decode's
first output; the receiver gives up after ``load_timeout_s`` and reports the load failed, and
vLLM's ``kv_load_failure_policy=recompute`` recomputes the prompt. A checksum mismatch, a layout
fingerprint mismatch or a wrong secret is a failure before any byte is used. A request aborted
while its pull waits or runs has the pull cancelled.

Modules: ``handle`` (pure data, router-safe), ``leases`` (holds and the checks before a pull),
``control`` (release and renew over gRPC, router-safe), ``grpc_server`` (the prefill's control
server and the ``grpc`` transport's stream), ``transports`` (the ``KvTransport`` interface and its
implementations, by name), ``layout`` (torch), ``messages``, ``scheduler_side``, ``worker_side``,
``connector`` (vLLM).
"""
