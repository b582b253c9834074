"""Distilling a draft model from a target: `python -m distill --help`.

The pipeline, one module per stage: `prompts` (training prompts, never Spec-Bench's) -> `corpus`
(the target's own responses to them) -> `students` (draft architectures initialized from the
target's embeddings, with a reduced output vocabulary) -> `distill` (knowledge distillation on the
target's next-token distributions, checkpointed) -> `evaluate` (greedy acceptance on prompts kept
aside). `run` ties them together behind one CLI.
"""
