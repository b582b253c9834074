"""The target service: the large model, per-session KV caches, batched Verify (gRPC)."""
