"""Structured output under speculation: the grammar masks the target's p at every verified
position and the draft's q at every drafted one, and the matcher follows rollbacks.

Proven here: the matcher state of `GrammarState` against a fresh matcher; greedy output equal to
constrained target-only decoding for a JSON schema, JSON objects, a regex, EBNF and Lark, with every
kind of draft; 100 random JSON schemas whose outputs all parse and validate with speculation on;
and the sampled output distribution under a small grammar equal to the target's masked
distribution, computed by an oracle that knows the grammar's language and not xgrammar.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re

import jsonschema
import pytest
import torch

from draft_service.drafters.model import ModelDrafter
from draft_service.drafters.ngram import NGramDrafter
from harness.inprocess import in_process_engine, run_generation
from harness.tiny import tiny_lm, with_eos
from orchestrator.generation import GenerationRequest
from specdec.errors import InvalidArgument
from specdec.grammar import Grammar, GrammarCompiler
from specdec.sampling import SamplingParams
from tests.helpers import joined
from tests.test_speculation import chisquare_pvalue, exact_target_marginals, sample_many

EOS = 2  # <|im_end|> of the SmolLM2 tokenizer
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "pet": {"enum": ["cat", "dog"]}},
          "required": ["name", "age", "pet"], "additionalProperties": False}
GRAMMARS = {
    "json_schema": Grammar("json_schema", json.dumps(SCHEMA)),
    "json_object": Grammar("json_object"),
    "regex": Grammar("regex", r"[0-9]{3}-[a-z]{2,4}( ok)?"),
    "ebnf": Grammar("ebnf", 'root ::= "(" digit+ ("+" digit+)* ")"\ndigit ::= [0-9]'),
    "lark": Grammar("lark", 'start: "[" word ("," word)* "]"\nword: /[a-z]{1,5}/'),
}


def matches(kind: str, text: str) -> bool:
    if kind in ("json_schema", "json_object"):
        value = json.loads(text)
        if kind == "json_schema":
            jsonschema.validate(value, SCHEMA)
        return isinstance(value, dict)
    pattern = {"regex": r"[0-9]{3}-[a-z]{2,4}( ok)?", "ebnf": r"\([0-9]+(\+[0-9]+)*\)", "lark": r"\[[a-z]{1,5}(,[a-z]{1,5})*\]"}[kind]
    return re.fullmatch(pattern, text) is not None


@pytest.fixture(scope="module")
def target(tiny_target):
    return with_eos(tiny_target, (EOS,))


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler.for_tokenizer(tokenizer, len(tokenizer), [EOS])


def test_the_matcher_follows_rollbacks_and_draft_rows(compiler, tokenizer):
    ids = tokenizer('{"name": "Ann", "age": 31, "pet": "cat"}').input_ids
    fresh = compiler.state(GRAMMARS["json_schema"])
    masks = []
    for token in ids:
        masks.append(fresh.mask())
        assert fresh.advance(token)
    assert fresh.mask().nonzero().flatten().tolist() == [EOS]

    state = compiler.state(GRAMMARS["json_schema"])
    assert state.sync(ids[:6]) and state.sync(ids[:3]) and state.consumed == ids[:3]  # forward, then back
    assert torch.equal(state.mask(), masks[3])
    rows = state.masks_along(ids[3:7])  # the verify rows after each draft prefix; the state stays put
    assert all(torch.equal(rows[j], masks[3 + j]) for j in range(5)) and state.consumed == ids[:3]
    forbidden = EOS  # the output is not complete: no end yet
    rows = state.masks_along([ids[3], forbidden, ids[5]])
    assert torch.equal(rows[1], masks[4]) and not rows[2].any() and not rows[3].any()
    assert not state.sync(ids[:3] + [forbidden]) and state.consumed == ids[:3]
    assert state.sync(ids) and torch.equal(state.mask(), fresh.mask())


@pytest.mark.parametrize("kind", list(GRAMMARS))
def test_greedy_constrained_output_equals_target_only_with_every_draft(target, tiny_draft, kind):
    request = dict(prompt="Answer:", max_new_tokens=48, grammar=GRAMMARS[kind])
    events = run_generation(in_process_engine(target), GenerationRequest(num_speculative_tokens=0, **request))
    baseline, text = joined(events)
    # a random model may fill an unbounded string or number until max_new_tokens; bounded grammars end
    assert matches(kind, text) if events[-1].finish_reason == "eos" else kind in ("json_object", "ebnf"), text
    for drafter in (ModelDrafter(target), ModelDrafter(tiny_draft), NGramDrafter()):
        for k in (1, 4):
            events = run_generation(in_process_engine(target, drafter), GenerationRequest(num_speculative_tokens=k, **request))
            assert joined(events)[0] == baseline, (type(drafter).__name__, k)
    same = run_generation(in_process_engine(target, ModelDrafter(target)), GenerationRequest(num_speculative_tokens=4, **request))
    assert same[-1].stats.acceptance_rate == 1.0  # the draft masks its q like the target its p


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON schema whose every value is bounded, so that even a random model completes it."""
    kinds = ["string", "integer", "boolean", "enum", "array"] + (["object"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 6)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "x", "y z", "quote\"", "42"], rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(0, 3)}
    names = rng.sample(["id", "name", "tags", "size", "ok", "inner", "note", "a_b"], rng.randint(1, 4))
    properties = {name: random_schema(rng, depth + 1) for name in names}
    return {"type": "object", "properties": properties, "required": rng.sample(names, rng.randint(0, len(names))),
            "additionalProperties": False}


def test_one_hundred_random_schemas_give_valid_json_with_speculation(target, tiny_draft):
    rng = random.Random(0)
    engine = in_process_engine(target, ModelDrafter(tiny_draft))
    accepted = 0
    for index in range(100):
        schema = {"type": "object", "properties": {"value": random_schema(rng)}, "required": ["value"], "additionalProperties": False}
        request = GenerationRequest(prompt=f"Item {index}:", max_new_tokens=400, temperature=1.0, seed=index, num_speculative_tokens=4,
                                    grammar=Grammar("json_schema", json.dumps(schema)))
        events = run_generation(engine, request)
        text = joined(events)[1]
        assert events[-1].finish_reason == "eos", (schema, text)
        jsonschema.validate(json.loads(text), schema)
        accepted += events[-1].stats.accepted_tokens
    assert accepted > 0


def test_bad_grammars_and_ignore_eos_are_refused_naming_the_field(target):
    engine = in_process_engine(target)
    for grammar, field in [(Grammar("json_schema", "{not json"), "grammar.json_schema"), (Grammar("regex", "(unclosed"), "grammar.regex"),
                           (Grammar("ebnf", "root ::= undefined_rule"), "grammar.ebnf"), (Grammar("yaml", "a: b"), "grammar")]:
        with pytest.raises(InvalidArgument) as error:
            run_generation(engine, GenerationRequest(prompt="x", max_new_tokens=4, grammar=grammar))
        assert error.value.field == field, grammar
    with pytest.raises(InvalidArgument) as error:
        run_generation(engine, GenerationRequest(prompt="x", max_new_tokens=4, grammar=GRAMMARS["json_object"], ignore_eos=True))
    assert error.value.field == "ignore_eos"


# A small grammar over a 16-token vocabulary, for the distribution test.
VOCABULARY = ["<eos>", "a", "b", "c", "ab", "ba", "cc", "x", "y", "z", "xy", "yz", "q", "r", "s", "t"]
LANGUAGE = [head + tail for head in ("ab", "ba", "cc") for n in (1, 2) for tail in map("".join, itertools.product("xyz", repeat=n))]


def oracle_allowed(prefix: tuple[int, ...]) -> torch.Tensor:
    """What the grammar allows after `prefix`, from its language alone; after an end of sequence,
    everything (the services leave such rows unmasked)."""
    if 0 in prefix:
        return torch.ones(16, dtype=torch.bool)
    text = "".join(VOCABULARY[t] for t in prefix)
    allowed = torch.tensor([any(w.startswith(text + VOCABULARY[t]) for w in LANGUAGE) for t in range(16)])
    allowed[0] = text in LANGUAGE
    return allowed


def test_constrained_sampled_output_distribution_equals_the_targets():
    target = tiny_lm(seed=21, vocab_size=16, eos=(0,), init=0.1)
    draft = tiny_lm(seed=22, vocab_size=16, eos=(0,), init=0.1)
    grammars = GrammarCompiler(VOCABULARY, [0], byte_level=False)
    prompt, params, steps = [3, 1, 4, 1, 5], SamplingParams(1.0), 4
    counts, stats = asyncio.run(sample_many(target, ModelDrafter(draft), prompt, params, 2, steps, trials=2000,
                                            grammar=Grammar("regex", "(ab|ba|cc)[xyz]{1,2}"), grammars=grammars))
    assert stats.accepted_tokens > 50 and stats.draft_tokens - stats.accepted_tokens > 50
    for step, exact in enumerate(exact_target_marginals(target, prompt, params, steps, oracle_allowed)):
        support = exact > 1e-9
        assert counts[step][~support].sum() == 0, step
        assert chisquare_pvalue(counts[step][support], exact[support]) > 1e-3, step
