"""specdec: the library shared by the three services.

sampling (the math), lm (batched forwards over per-sequence KV caches), models (loading),
sessions (TTL and memory budget), messages and wire (domain objects and their protobuf forms),
serving (gRPC server plumbing), errors and validation.
"""
