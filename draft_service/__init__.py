"""The draft service: drafters (a small causal LM, prompt-lookup n-grams) behind Propose (gRPC)."""
