"""What the two model services (target and draft) share and the orchestrator does not: the
model worker, the session RPCs and service life cycle (`runtime`), and the batching scheduler that
fuses concurrent calls into one forward pass (`batching`)."""
