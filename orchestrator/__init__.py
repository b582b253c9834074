"""The orchestrator: the public Generate API, the speculation loop across the network, text."""
