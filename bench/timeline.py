"""Where one round's time goes, through the real services: per call kind (Propose, Verify), the
conversions in the orchestrator, transport (serialization, gRPC, the network), the service's own
overhead (conversions and hand-offs in its handler), queue and model compute, and the
orchestrator's own work between calls; from the request stats (orchestrator.proto).

    python -m bench.timeline [--draft smollm2-draft-l6] [--requests 6] [--max-new-tokens 64] [--dtype auto]
                             [--transports streams,unary]

Prints a table in milliseconds per round (median over requests) for target-only decoding and for a
fixed K, each over every transport of a session's rounds (one stream per session and service, the
orchestrator's default, or a unary call per round: --no-round-streams) side by side, the modes
rotated per prompt; writes timeline.json and timeline.png to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench.specbench import default_prompts, load_prompts
from harness.processes import ServiceStack
from specdec.v1 import orchestrator_pb2

RESULTS = Path(__file__).resolve().parent / "results" / "timeline"
TRANSPORTS = {"streams": (), "unary": ("--no-round-streams",)}  # orchestrator flags of each
PARTS = (
    ("orchestrator", "orchestrator_seconds"),
    ("draft: conversion", "draft_conversion_seconds"),
    ("draft: transport", "draft_transport_seconds"),
    ("draft: service overhead", "draft_service_overhead_seconds"),
    ("draft: compute", "draft_seconds"),
    ("target: conversion", "target_conversion_seconds"),
    ("target: transport", "target_transport_seconds"),
    ("target: service overhead", "target_service_overhead_seconds"),
    ("queue (both)", "queue_seconds"),
    ("target: compute", "target_seconds"),
)
OUTSIDE_COMPUTE = ("orchestrator", "draft: conversion", "draft: transport", "draft: service overhead", "target: conversion",
                   "target: transport", "target: service overhead", "queue (both)")


def per_round(stats) -> dict[str, float]:
    """Milliseconds per round of each part (prefill calls included in the request's sums)."""
    return {name: 1000 * getattr(stats, field) / stats.rounds for name, field in PARTS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.timeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", default="smollm2-draft-l6")
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", help="weight format of both model services")
    parser.add_argument("--prompts", type=Path, default=default_prompts(), help="Spec-Bench-format JSONL (default: $SPECDEC_PROMPTS, else bench/prompts/)")
    parser.add_argument("--transports", default="streams,unary", help=f"comma-separated, of {', '.join(TRANSPORTS)}")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    prompts = load_prompts(args.prompts, args.requests)
    transports = args.transports.split(",")
    flags = ("--dtype", args.dtype)
    modes = [(transport, k) for transport in transports for k in (0, args.k)]
    label = lambda transport, k: f"{transport}, {'target-only' if k == 0 else f'K={k}'}"  # noqa: E731
    rounds: dict[str, list[dict[str, float]]] = {label(*mode): [] for mode in modes}
    with ServiceStack(draft_model=args.draft, log_dir=args.out / "logs", extra_target_args=flags,
                      extra_draft_args=flags if args.draft != "ngram" else (), extra_orchestrator_args=TRANSPORTS[transports[0]],
                      orchestrator_variants={t: TRANSPORTS[t] for t in transports[1:]}) as stack:
        stubs = {t: stack.orchestrator_stub(name="orchestrator" if i == 0 else t) for i, t in enumerate(transports)}
        for index, prompt in enumerate(prompts):
            for transport, k in modes[index % len(modes):] + modes[: index % len(modes)]:
                request = orchestrator_pb2.GenerateRequest(max_new_tokens=args.max_new_tokens, num_speculative_tokens=k)
                request.messages.add(role="user", content=prompt.text)
                if index == 0:
                    stubs[transport].Generate(request, timeout=600)  # warm-up
                stats = stubs[transport].Generate(request, timeout=600).stats
                rounds[label(transport, k)].append({**per_round(stats), "tokens/s": stats.generated_tokens / stats.total_seconds})
            print(f"request {index + 1}/{len(prompts)}", file=sys.stderr)
    summary = {mode: {name: statistics.median(r[name] for r in runs) for name in runs[0]} for mode, runs in rounds.items()}
    for row in summary.values():
        row["outside compute"] = sum(row[name] for name in OUTSIDE_COMPUTE)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "timeline.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "ms_per_round": summary}, indent=2))
    print(f"| ms per round (median of {len(prompts)} requests) | " + " | ".join(summary) + " |\n|---|" + "---|" * len(summary))
    for name in [n for n, _ in PARTS] + ["outside compute", "tokens/s"]:
        print(f"| {name} | " + " | ".join(f"{row[name]:.2f}" for row in summary.values()) + " |")
    plot(summary, args.out / "timeline.png")
    return 0


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 1.5 + 0.5 * len(summary)))
    labels = list(summary)
    left = [0.0] * len(summary)
    for name, _ in PARTS:
        widths = [row[name] for row in summary.values()]
        axis.barh(labels, widths, left=left, label=name)
        left = [a + b for a, b in zip(left, widths)]
    axis.set_xlabel("milliseconds per round")
    axis.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
