"""The worker-side sections of pdserve's configuration: the engine and the KV-transfer layer
(re-exported by ``pdserve.base.config``, which assembles the whole)."""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.base.schema import require


@dataclass(frozen=True)
class EngineConfig:
    """How every worker's vLLM engine is built (the same for both pools)."""

    model: str = ""
    """Local Hugging Face model folder; empty means the bundled SmolLM2-135M-Instruct."""
    dtype: str = "bfloat16"
    """Weights and KV-cache dtype: ``bfloat16`` or ``float32``."""
    max_model_len: int = 2048
    """Context length (prompt + output tokens) each engine accepts."""
    block_size: int = 32
    """Tokens per KV-cache block; prefix caching and KV transfer work in whole blocks (the CPU
    attention backend needs a multiple of 32)."""
    kv_cache_gib: int = 1
    """KV-cache memory per engine on CPU, whole GiB (``VLLM_CPU_KVCACHE_SPACE``)."""
    max_num_seqs: int = 32
    """Most requests an engine runs in one batch."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of shared prompt prefixes."""
    enforce_eager: bool = True
    """Eager mode; compiled mode changed greedy output on CPU."""
    device: str = "auto"
    """``auto``: one GPU per worker where Ray has GPUs, else one CPU core; or ``cpu``/``gpu``."""

    def __post_init__(self) -> None:
        require(self.dtype in ("bfloat16", "float32", "float16"), f"engine.dtype: unknown {self.dtype!r}")
        require(self.max_model_len >= 16, "engine.max_model_len must be >= 16")
        require(self.block_size in (16, 32, 64, 128), "engine.block_size must be 16, 32, 64 or 128")
        require(isinstance(self.kv_cache_gib, int) and self.kv_cache_gib >= 1, "engine.kv_cache_gib must be a whole number >= 1")
        require(self.max_num_seqs >= 1, "engine.max_num_seqs must be >= 1")
        require(self.device in ("auto", "cpu", "gpu"), f"engine.device: unknown {self.device!r}")


KV_TRANSPORTS = ("tcp", "grpc", "gloo")
"""The names ``kv_transfer.transports`` registers (a test keeps the two equal)."""


@dataclass(frozen=True)
class KvTransferConfig:
    """The KV-transfer layer between the pools."""

    transport: str = "tcp"
    """How KV bytes travel from a prefill to a decode engine: ``tcp`` (large frames in place, one
    xxh3 per transfer; the fastest here), ``grpc`` (a chunked gRPC stream, CRC32 per chunk) or
    ``gloo`` (torch.distributed point to point; the same code runs NCCL on GPUs). Release and
    lease renewal always use the gRPC control server."""

    lease_s: float = 60.0
    """A prefill instance frees a finished request's KV blocks after this long if no decode
    instance released them first."""
    load_timeout_s: float = 30.0
    """A decode instance gives up a KV pull after this long and recomputes the prompt."""
    chunk_blocks: int = 64
    """Blocks per streamed chunk (each chunk is one layer's run of blocks)."""
    idle_wait_ms: float = 5.0
    """An engine step that runs no forward pass while pulls run or blocks are held waits up to
    this long for one of them to end (0: at once, as vLLM otherwise does every millisecond).
    Such idle steps took a third of a 2-core machine's CPU away from the transfers they wait
    for; a request that arrives meanwhile waits at most this long to be scheduled."""

    def __post_init__(self) -> None:
        require(self.transport in KV_TRANSPORTS, f"kv_transfer.transport must be one of {KV_TRANSPORTS}")
        require(self.lease_s > 0, "kv_transfer.lease_s must be > 0")
        require(self.load_timeout_s > 0, "kv_transfer.load_timeout_s must be > 0")
        require(self.chunk_blocks >= 1, "kv_transfer.chunk_blocks must be >= 1")
        require(0 <= self.idle_wait_ms <= 100, "kv_transfer.idle_wait_ms must be in [0, 100]")
