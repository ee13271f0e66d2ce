"""The engine layer: one vLLM engine in a worker process (``host``), the Ray actor base the prefill and
decode workers share (``actor``), and the stat logger that feeds their load snapshots (``stats``)."""
