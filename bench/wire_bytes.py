"""Bytes exchanged with the model services per speculation round, greedy and sampling.

    python -m bench.wire_bytes [--draft embedded] [-k 4]

Greedy rounds carry token ids only; sampling rounds add K+1 uniform numbers and, for model
drafters, the draft's sparse distributions (max_support ids and probabilities per draft token).
"""

from __future__ import annotations

import argparse

from harness.processes import ServiceStack
from specdec.v1 import orchestrator_pb2

QUESTION = "Explain in two sentences why the sky is blue."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", default="embedded", help="draft service model ('ngram' or a model)")
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    with ServiceStack(draft_model=args.draft) as stack:
        stub = stack.orchestrator_stub()
        for label, temperature in (("greedy", 0.0), ("sampling T=0.7", 0.7)):
            request = orchestrator_pb2.GenerateRequest(
                max_new_tokens=args.max_new_tokens, num_speculative_tokens=args.k, temperature=temperature, seed=1
            )
            request.messages.add(role="user", content=QUESTION)
            stats = stub.Generate(request, timeout=900).stats
            print(
                f"draft={args.draft} K={args.k} {label}: {stats.bytes_per_round:.0f} bytes per round "
                f"({stats.rounds} rounds, acceptance {stats.acceptance_rate:.2f}, "
                f"network {1000 * stats.network_seconds / max(stats.rounds, 1):.2f} ms per round)"
            )


if __name__ == "__main__":
    main()
