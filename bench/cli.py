"""`python -m bench`: speculative decoding through the services against its alternatives, on the
same Spec-Bench-format prompts, in one run, interleaved (see README "Benchmarks").

For every prompt, every configuration runs once, in an order that rotates from prompt to prompt so
that a slow spell of this shared machine does not always hit the same configuration. Each record
is appended to records.jsonl as soon as it is measured; `--resume` skips what is already there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from bench.hf_baselines import HFBench, hf_configs
from bench.plots import write_plots
from bench.report import category_markdown, methods_markdown, summarize, write_outputs
from bench.services import SELF_DRAFT, ServiceBench, service_configs
from bench.specbench import default_prompts, load_prompts
from bench.theory import verify_cost_curve
from draft_service.drafters import early_exit
from draft_service.drafters.feature import is_feature_drafter
from draft_service.drafters.staged import parse_spec
from specdec.weights import AUTO, FORMATS

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--prompts", type=Path, default=default_prompts(), help="Spec-Bench-format JSONL (default: $SPECDEC_PROMPTS, else bench/prompts/)")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts only")
    parser.add_argument("--per-category", type=int, default=None, help="first N prompts of each category only")
    parser.add_argument("--drafters", default="ngram", help="comma-separated draft service models (draft_service --model), or self-draft:X (the target's --self-draft X)")
    parser.add_argument("--k", default="4", help="comma-separated draft lengths K to sweep")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0, help="per-request seed when sampling")
    parser.add_argument("--target", default="embedded", help="target model of the target service")
    parser.add_argument("--device", default="cpu", help="device of the model services (cuda works unchanged)")
    parser.add_argument(
        "--dtype", default="auto", choices=(AUTO, *FORMATS),
        help="weight format of the model services (auto: timed at warm-up); the in-process HF baselines run float32 for quantized formats",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "bench", help="output directory")
    parser.add_argument("--resume", action="store_true", help="keep records already in OUT/records.jsonl and skip them")
    parser.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True,
                        help="also run Hugging Face generate(), assisted generation with each draft model, and prompt lookup in-process")
    parser.add_argument("--report-only", action="store_true", help="rebuild the summary, tables and plots from OUT/records.jsonl and OUT/summary.json's verify curve")
    parser.add_argument("--quick", action="store_true", help="3 prompts of different categories, K=4, 32 new tokens: a smoke run of a few minutes")
    args = parser.parse_args(argv)
    if args.quick:
        args.per_category, args.limit, args.max_new_tokens, args.k = 1, 3, 32, "4"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = load_prompts(args.prompts, args.limit, args.per_category)
    drafters = [d for d in args.drafters.split(",") if d]
    ks = [int(k) for k in args.k.split(",")]
    # Hugging Face's assisted generation takes draft models, not n-grams, feature drafters, exits or stages
    draft_models = [d for d in drafters if d != "ngram" and not is_feature_drafter(d) and not early_exit.directory_of(d) and not parse_spec(d)
                    and not d.startswith(SELF_DRAFT)]
    through_services, in_process_configs = service_configs(drafters, ks), (hf_configs(draft_models, ks) if args.hf else [])
    configs = through_services + in_process_configs
    records_path = args.out / "records.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        records = [json.loads(line) for line in records_path.read_text().splitlines()]
        return _report(args, prompts, records, json.loads((args.out / "summary.json").read_text())["verify_cost_curve"])
    if not args.resume:
        records_path.unlink(missing_ok=True)
    records = [json.loads(line) for line in records_path.read_text().splitlines()] if records_path.exists() else []
    done = {(r["question_id"], r["method"]) for r in records}
    todo = [(p, c) for i, p in enumerate(prompts) for c in _rotated(configs, i) if (p.question_id, c.name) not in done]
    print(f"{len(prompts)} prompts x {len(configs)} configurations; {len(todo)} runs to do", file=sys.stderr)
    with ServiceBench(drafters, args.target, args.device, args.dtype, args.out / "logs") as services, records_path.open("a") as out:
        in_process = HFBench(args.target, draft_models if args.hf else [], args.device, args.dtype)
        print("measuring the target's verify cost curve T(n)/T(1)", file=sys.stderr)
        curve = verify_cost_curve(in_process.target, max(ks) + 1)
        runners = {**{c: services for c in through_services}, **{c: in_process for c in in_process_configs}}
        for config in configs:  # warm-up of every path, not recorded
            runners[config].measure(config, prompts[0], 4, args.temperature, args.seed)
        bar = tqdm(todo, desc="bench", unit="run", file=sys.stderr, dynamic_ncols=True)
        for prompt, config in bar:
            record = runners[config].measure(config, prompt, args.max_new_tokens, args.temperature, args.seed)
            records.append(record)
            out.write(json.dumps(record) + "\n")
            out.flush()
            bar.set_postfix_str(f"q{prompt.question_id} {prompt.category} {config.name}: {record['tokens_per_second']:.1f} tok/s")
    return _report(args, prompts, records, curve)


def _report(args: argparse.Namespace, prompts: list, records: list[dict], curve: list[float]) -> int:
    wanted = {p.question_id for p in prompts}
    summary = summarize([r for r in records if r["question_id"] in wanted], curve)
    summary["verify_cost_curve"] = curve
    summary["settings"] = {k: str(v) for k, v in vars(args).items()}
    write_outputs(args.out, records, summary)
    write_plots(args.out, summary, [r for r in records if r["question_id"] in wanted])
    print(methods_markdown(summary))
    print()
    print(category_markdown(summary))
    return 0


def _rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]
