"""What a user would run instead, in this process with Hugging Face transformers and the same
target: plain `generate()`, assisted generation with the same draft model (`assistant_model`), and
prompt-lookup decoding (`prompt_lookup_num_tokens`). Greedy unless a temperature is given.

Assisted generation drafts a fixed K here (constant schedule, no confidence cut-off), the same K
as the services, so the two are compared at equal settings. It loads the draft as transformers
sees the directory: with the full-vocabulary head (the reduced head is our drafter's).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from bench.specbench import BenchPrompt
from specdec.chat import chat_token_ids
from specdec.models import LoadedModel, load_causal_lm, resolve

HF_GENERATE = "hf-generate"


@dataclass(frozen=True)
class HFConfig:
    kind: str  # "generate", "assisted", "prompt-lookup"
    k: int = 0
    draft: str = ""

    @property
    def name(self) -> str:
        if self.kind == "generate":
            return HF_GENERATE
        if self.kind == "assisted":
            return f"hf-assisted {Path(self.draft).name} K={self.k}"
        return f"hf-prompt-lookup K={self.k}"


def hf_configs(drafts: list[str], ks: list[int]) -> list[HFConfig]:
    configs = [HFConfig("generate")]
    configs += [HFConfig("assisted", k, d) for d in drafts for k in ks]
    configs += [HFConfig("prompt-lookup", k) for k in ks]
    return configs


class HFBench:
    def __init__(self, target: str, drafts: list[str], device: str, dtype: str):
        self.target: LoadedModel = load_causal_lm(target, device, dtype)
        self.assistants = {
            d: AutoModelForCausalLM.from_pretrained(resolve(d), dtype=self.target.dtype).to(device).eval() for d in drafts
        }

    def measure(self, config: HFConfig, prompt: BenchPrompt, max_new_tokens: int, temperature: float, seed: int) -> dict:
        ids = chat_token_ids(self.target.tokenizer, [{"role": "user", "content": prompt.text}])
        options = dict(
            max_new_tokens=max_new_tokens,
            eos_token_id=list(self.target.eos_token_ids),
            pad_token_id=self.target.eos_token_ids[0],
            do_sample=temperature > 0,
        )
        if temperature > 0:
            options.update(temperature=temperature, top_k=0, top_p=1.0)
        if config.kind == "assisted":
            assistant = self.assistants[config.draft]
            assistant.generation_config.num_assistant_tokens = config.k
            assistant.generation_config.num_assistant_tokens_schedule = "constant"
            assistant.generation_config.assistant_confidence_threshold = 0.0
            options["assistant_model"] = assistant
        elif config.kind == "prompt-lookup":
            options["prompt_lookup_num_tokens"] = config.k
        torch.manual_seed(seed)
        input_ids = torch.tensor([ids], device=self.target.device)
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.target.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **options)
        seconds = time.perf_counter() - started
        new = output[0, len(ids) :].tolist()
        if new and new[-1] in self.target.eos_token_ids:
            new = new[:-1]  # the services do not return the EOS token either
        return {
            "question_id": prompt.question_id,
            "category": prompt.category,
            "method": config.name,
            "drafter": config.draft or config.kind,
            "k": 0,  # no speculation statistics from transformers
            "token_ids": new,
            "tokens": len(new),
            "seconds": seconds,
            "tokens_per_second": len(new) / seconds,
        }
