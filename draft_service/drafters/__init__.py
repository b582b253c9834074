"""Drafters: what proposes draft tokens. Each one implements `Drafter` (drafters/base.py)."""
