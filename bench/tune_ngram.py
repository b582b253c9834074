"""Choose the n-gram drafter's settings from target-only outputs on prompts that are not
Spec-Bench's (GSM8K and HumanEval), by replaying greedy decoding offline.

    python -m bench.tune_ngram [--prompts 12] [--max-new-tokens 96]

Greedy speculative decoding is deterministic: given the target's greedy output, the tokens each
round accepts follow from the proposals alone. So one target-only generation per prompt lets us
score every (min n, max n, K) setting without running the target again. Each setting's cost is
sum over rounds of T(len(proposal) + 1) / T(1), with the verify-cost curve T(n) measured here on
the target; the estimated speedup is tokens / cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from draft_service.drafters.ngram import lookup
from orchestrator.generation import encode_prompt
from specdec import lm
from specdec.models import load_causal_lm

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def tuning_prompts(count: int) -> list[str]:
    gsm = [json.loads(line)["question"] for line in (DATA / "gsm8k_train.jsonl").read_text().splitlines()[: count // 2]]
    code = [
        "Complete this Python function:\n" + json.loads(line)["prompt"]
        for line in (DATA / "humaneval.jsonl").read_text().splitlines()[: count - count // 2]
    ]
    return gsm + code


def verify_cost_curve(model, prompt_ids: list[int], widths: range, repeats: int = 5) -> dict[int, float]:
    """Median seconds of one forward of n new tokens after a cached prompt, for each n."""
    costs = {}
    for width in widths:
        samples = []
        for _ in range(repeats):
            cache = lm.SequenceCache()
            lm.forward(model, [cache], [prompt_ids], logits_for_last=1)
            started = time.perf_counter()
            lm.forward(model, [cache], [prompt_ids[-width:]])
            samples.append(time.perf_counter() - started)
        costs[width] = statistics.median(samples)
    return costs


def replay(prompt: list[int], output: list[int], k: int, min_n: int, max_n: int) -> tuple[int, list[int]]:
    """Rounds of greedy speculative decoding with n-gram drafts: (tokens, proposal lengths)."""
    sequence, position, proposals = list(prompt), 0, []
    while position < len(output):
        proposal = lookup(sequence, min(k, len(output) - position - 1), max_n, min_n) if len(output) - position > 1 else []
        accepted = 0
        while accepted < len(proposal) and proposal[accepted] == output[position + accepted]:
            accepted += 1
        proposals.append(len(proposal))
        step = accepted + 1
        sequence += output[position : position + step]
        position += step
    return len(output), proposals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    loaded = load_causal_lm("embedded")
    samples = []
    for index, text in enumerate(tuning_prompts(args.prompts)):
        prompt, _ = encode_prompt(loaded.tokenizer, "", (("user", text),))
        with torch.inference_mode():
            out = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=args.max_new_tokens, do_sample=False)
        samples.append((prompt, out[0, len(prompt) :].tolist()))
        print(f"generated {index + 1}/{args.prompts}", flush=True)
    curve = verify_cost_curve(loaded.model, samples[0][0], range(1, 10))
    relative = {n: curve[n] / curve[1] for n in curve}
    print("verify cost T(n)/T(1):", {n: round(r, 2) for n, r in relative.items()})
    results = []
    for k in (1, 2, 3, 4, 6, 8):
        for min_n in (1, 2, 3):
            for max_n in range(min_n, 5):
                tokens = cost = 0.0
                for prompt, output in samples:
                    produced, proposals = replay(prompt, output, k, min_n, max_n)
                    tokens += produced
                    cost += sum(relative[p + 1] for p in proposals)
                results.append({"k": k, "min_n": min_n, "max_n": max_n, "estimated_speedup": tokens / cost})
    results.sort(key=lambda r: -r["estimated_speedup"])
    for row in results[:10]:
        print(row)


if __name__ == "__main__":
    main()
