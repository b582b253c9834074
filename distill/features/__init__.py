"""Feature drafters distilled from a target's own hidden states: `python -m distill.features --help`.

Stages, one module each: `corpus` (the target's greedy responses and its features, sharded on
disk) -> `train` (the chain drafter unrolled on its own predictions, and the multi-token heads) ->
`evaluate` (greedy acceptance replayed on held-out responses). `run` ties them behind one CLI.
"""
