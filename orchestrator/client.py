"""python -m orchestrator.client: stream a generation from the orchestrator to the terminal.

    python -m orchestrator.client "Write a haiku about rivers."
    python -m orchestrator.client --raw --max-new-tokens 64 -k 0 "def fibonacci(n):"

Text goes to stdout as it arrives; the statistics go to stderr at the end.
"""

from __future__ import annotations

import argparse
import sys

import grpc

from specdec.v1 import orchestrator_pb2, orchestrator_pb2_grpc

FINISH = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in orchestrator_pb2.FinishReason.items()}


def build_request(args: argparse.Namespace) -> orchestrator_pb2.GenerateRequest:
    request = orchestrator_pb2.GenerateRequest(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, stop=args.stop
    )
    if args.raw:
        request.prompt = args.prompt
    else:
        request.messages.add(role="user", content=args.prompt)
    if args.top_p is not None:
        request.top_p = args.top_p
    if args.seed is not None:
        request.seed = args.seed
    if args.k is not None:
        request.num_speculative_tokens = args.k
    return request


def stream(address: str, request: orchestrator_pb2.GenerateRequest, timeout: float, out=sys.stdout) -> orchestrator_pb2.GenerateResponse:
    """Print the text as it streams; return the last message (finish reason and stats)."""
    with grpc.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        last = None
        for message in stub.GenerateStream(request, timeout=timeout):
            out.write(message.text)
            out.flush()
            last = message
        out.write("\n")
        return last


def format_stats(response: orchestrator_pb2.GenerateResponse) -> str:
    s = response.stats
    return (
        f"finish={FINISH[response.finish_reason]} tokens={s.generated_tokens} K={s.num_speculative_tokens} "
        f"acceptance={s.acceptance_rate:.2f} tokens/target-forward={s.tokens_per_target_forward:.2f} "
        f"time={s.total_seconds:.2f}s ({s.generated_tokens / max(s.total_seconds, 1e-9):.1f} tok/s) "
        f"target={s.target_seconds:.2f}s draft={s.draft_seconds:.2f}s network={s.network_seconds:.3f}s "
        f"bytes/round={s.bytes_per_round:.0f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", help="the user message (or raw prompt with --raw)")
    parser.add_argument("--address", default="127.0.0.1:50050", help="orchestrator address")
    parser.add_argument("--raw", action="store_true", help="send the prompt as raw text instead of a chat message")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1]")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most probable tokens; 0: all")
    parser.add_argument("--seed", type=int, default=None, help="seed of the request's random generator")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("-k", "--num-speculative-tokens", dest="k", type=int, default=None, help="K; 0 = target-only; default: the server's")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds")
    args = parser.parse_args(argv)
    try:
        last = stream(args.address, build_request(args), args.timeout)
    except grpc.RpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print(format_stats(last), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
