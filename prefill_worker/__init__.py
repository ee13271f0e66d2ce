"""The prefill pool's worker: a Ray actor hosting a vLLM engine as KV producer."""
