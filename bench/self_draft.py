"""What a self-drafting target's cache reuse saves: `python -m bench.self_draft --exit 10`.

In one process, on the real target (a torch weight format: self-drafting runs the lean path), per
trial: a fresh session on a prompt, one self-draft of K tokens, then the Verify of the pending
token and the K drafts, timed, with the draft's span reused (layers below L not computed again
for K positions) or discarded (a full verify), the two alternating. Also the draft's own time
per round and a one-token step. Medians and spread of the trials, printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.report import spread
from bench.specbench import load_prompts
from draft_service.engine import DraftEngine
from specdec import lm, sampling
from specdec.chat import chat_token_ids
from specdec.messages import ProposeWork, VerifyWork
from specdec.models import load_causal_lm
from target_service.engine import TargetEngine
from target_service.self_draft import SelfDraft, SelfDrafter, parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.self_draft", description=__doc__.split("\n")[0])
    parser.add_argument("--exit", default="10", help="--self-draft's value: L, early-exit:L or an exit's directory")
    parser.add_argument("--target", default="embedded")
    parser.add_argument("--dtype", default="float32", help="a torch weight format (self-drafting runs the lean path)")
    parser.add_argument("--prompts", type=Path, default=Path("../shared/data/specbench_dev.jsonl"))
    parser.add_argument("--trials", type=int, default=24, help="verifies timed per mode")
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/self_draft/reuse.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_causal_lm(args.target, "cpu", args.dtype)
    layers, exit_directory = parse(args.exit)
    engine = TargetEngine(loaded, self_draft=SelfDraft(loaded.model, layers, exit_directory))
    engine.warm_up()
    drafts = DraftEngine(SelfDrafter(engine), max_context=loaded.max_context)
    prompts = [chat_token_ids(loaded.tokenizer, [{"role": "user", "content": p.text}]) for p in load_prompts(args.prompts)]
    times: dict[str, list[float]] = {"reused": [], "full": [], "draft": []}
    for trial in range(2 * args.trials):
        mode = "reused" if trial % 2 == 0 else "full"
        prompt, sid = prompts[trial // 2 % len(prompts)], f"t{trial}"
        engine.start_session(sid, prompt)
        drafts.start_session(sid, prompt)
        started = time.perf_counter()
        proposal = drafts.propose([ProposeWork(sid, len(prompt) - 1, prompt[-1:], args.k, sampling.GREEDY, [])])[0][0]
        times["draft"].append(time.perf_counter() - started)
        if mode == "full":
            engine.sessions.get(sid).span = None
        started = time.perf_counter()
        engine.verify([VerifyWork(sid, len(prompt) - 1, prompt[-1:], proposal.tokens, None, sampling.GREEDY, [])])
        times[mode].append(time.perf_counter() - started)
        engine.end_session(sid)
        drafts.end_session(sid)
    step = lm.forward_seconds(loaded.model, 1, context=200)
    result = {
        "exit": args.exit, "layers": layers, "target_layers": lm.num_layers(loaded.model), "k": args.k, "format": lm.weight_format(loaded.model),
        "threads": args.threads, "target_step_ms": 1e3 * step,
        **{f"{name}_ms": spread([1e3 * t for t in values]) for name, values in times.items()},
    }
    result["saved_fraction"] = 1 - result["reused_ms"]["median"] / result["full_ms"]["median"]
    result["ideal_saved_fraction"] = args.k * layers / ((args.k + 1) * lm.num_layers(loaded.model))  # K of K + 1 positions skip L of N layers
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: (v["median"] if isinstance(v, dict) else v) for k, v in result.items()}, indent=2))
    print(f"verify of {args.k + 1} tokens: {statistics.median(times['full']) * 1e3:.1f} ms full, "
          f"{statistics.median(times['reused']) * 1e3:.1f} ms reusing the layers below {layers}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
