"""Conversions between protobuf messages (specdec.v1) and the domain objects of messages.py.

The only place that knows both sides; servicers and clients call these and nothing else. Sparse
distributions travel as raw little-endian bytes (int32 ids, float32 probabilities): a repeated
float field costs far more CPU to (de)serialize in Python.
"""

from __future__ import annotations

import numpy as np
import torch

from specdec import validation
from specdec.errors import InvalidArgument
from specdec.grammar import Grammar
from specdec.messages import Features, Logprobs, ModelInfo, Proposal, ProposeWork, SparseDistribution, VerifyWork
from specdec.sampling import SamplingParams, Verdict
from specdec.trees import TreeShape
from specdec.v1 import common_pb2, draft_pb2, target_pb2


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
        repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, logit_bias=dict(params.logit_bias), position_seed=params.position_seed,
        min_tokens=params.min_tokens, end_token_ids=params.end_token_ids,
    )


def sampling_from_proto(message: common_pb2.SamplingParams, prefix: str) -> SamplingParams:
    """Validated, except that logit_bias ids are in the vocabulary: the engine knows its size."""
    return validation.sampling_params(
        message.temperature, message.top_k, message.top_p, prefix, min_p=message.min_p,
        repetition_penalty=message.repetition_penalty or 1.0, presence_penalty=message.presence_penalty,
        frequency_penalty=message.frequency_penalty, logit_bias=dict(message.logit_bias),
        position_seed=message.position_seed if message.HasField("position_seed") else None,
        min_tokens=message.min_tokens, end_token_ids=tuple(message.end_token_ids),
    )


def grammar_to_proto(grammar: Grammar | None) -> common_pb2.Grammar | None:
    if grammar is None:
        return None
    if grammar.kind == "json_object":
        return common_pb2.Grammar(json_object=True)
    return common_pb2.Grammar(**{grammar.kind: grammar.source})


def grammar_from_proto(message: common_pb2.Grammar, present: bool, field: str) -> Grammar | None:
    """None when unset; INVALID_ARGUMENT when set without a kind."""
    if not present:
        return None
    kind = message.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("set one of json_schema, json_object, regex, ebnf, lark", field)
    return Grammar(kind, "" if kind == "json_object" else getattr(message, kind))


def distribution_to_proto(distribution: SparseDistribution) -> common_pb2.SparseDistribution:
    ids, probs = distribution
    return common_pb2.SparseDistribution(
        token_ids=ids.numpy().astype("<i4").tobytes(), probs=probs.numpy().astype("<f4").tobytes()
    )


def distribution_from_proto(message: common_pb2.SparseDistribution, field: str) -> SparseDistribution:
    if len(message.token_ids) % 4 or len(message.probs) % 4:
        raise InvalidArgument("token_ids and probs must be whole int32 / float32 values (4 bytes each)", field)
    ids = torch.from_numpy(np.frombuffer(message.token_ids, dtype="<i4").astype(np.int64))
    probs = torch.from_numpy(np.frombuffer(message.probs, dtype="<f4").astype(np.float32))
    return ids, probs


def _distributions(messages, field: str) -> list[SparseDistribution] | None:
    if not messages:
        return None
    return [distribution_from_proto(m, f"{field}[{i}]") for i, m in enumerate(messages)]


def features_to_proto(features: Features | None) -> common_pb2.Features | None:
    if features is None:
        return None
    rows = features.rows.to(torch.bfloat16).contiguous()
    data = rows.view(torch.int16).numpy().astype("<i2").tobytes()  # numpy has no bfloat16: move the bits
    return common_pb2.Features(start=features.start, rows=rows.shape[0], width=rows.shape[1], data=data)


def features_from_proto(message, present: bool, field: str) -> Features | None:
    """None when the field is unset; INVALID_ARGUMENT when the bytes do not hold rows x width values."""
    if not present:
        return None
    if not message.rows or not message.width or len(message.data) != 2 * message.rows * message.width:
        raise InvalidArgument(f"data must hold rows x width ({message.rows} x {message.width}) bfloat16 values, got {len(message.data)} bytes", field)
    bits = np.frombuffer(message.data, dtype="<i2").astype(np.int16)
    return Features(message.start, torch.from_numpy(bits).view(torch.bfloat16).view(message.rows, message.width))


def logprobs_to_proto(logprobs: Logprobs | None) -> target_pb2.Logprobs | None:
    if logprobs is None:
        return None
    return target_pb2.Logprobs(
        logprobs=np.asarray(logprobs.logprobs, dtype="<f4").tobytes(),
        top_token_ids=np.asarray(logprobs.top_token_ids, dtype="<i4").tobytes(),
        top_logprobs=np.asarray(logprobs.top_logprobs, dtype="<f4").tobytes(),
    )


def logprobs_from_proto(message: target_pb2.Logprobs, present: bool, field: str) -> Logprobs | None:
    """None when the field is unset; INVALID_ARGUMENT when the bytes do not hold n and n x top values."""
    if not present:
        return None
    rows, top = len(message.logprobs) // 4, len(message.top_token_ids)
    if not rows or len(message.logprobs) % 4 or top != len(message.top_logprobs) or top % (4 * rows):
        raise InvalidArgument("logprobs must hold n float32 values, top_token_ids and top_logprobs n x top each", field)
    ids = np.frombuffer(message.top_token_ids, dtype="<i4").reshape(rows, -1)
    values = np.frombuffer(message.top_logprobs, dtype="<f4").reshape(rows, -1)
    return Logprobs(np.frombuffer(message.logprobs, dtype="<f4").tolist(), ids.tolist(), values.tolist())


def verify_item_to_proto(work: VerifyWork) -> target_pb2.VerifyItem:
    return target_pb2.VerifyItem(
        session_id=work.session_id,
        prefix_len=work.prefix_len,
        tokens=work.tokens,
        draft_tokens=work.draft_tokens,
        draft_probs=[distribution_to_proto(d) for d in work.draft_probs or []],
        sampling=sampling_to_proto(work.sampling),
        uniforms=work.uniforms,
        logprobs=work.logprobs,
        warped_logprobs=work.warped_logprobs,
        draft_parents=work.draft_parents,
    )


def verify_item_from_proto(item: target_pb2.VerifyItem, index: int) -> VerifyWork:
    prefix = f"items[{index}]."
    return VerifyWork(
        session_id=item.session_id,
        prefix_len=item.prefix_len,
        tokens=list(item.tokens),
        draft_tokens=list(item.draft_tokens),
        draft_probs=_distributions(item.draft_probs, prefix + "draft_probs"),
        sampling=sampling_from_proto(item.sampling, prefix + "sampling."),
        uniforms=list(item.uniforms),
        logprobs=item.logprobs if item.HasField("logprobs") else None,
        warped_logprobs=item.warped_logprobs,
        draft_parents=list(item.draft_parents) or None,
    )


def verdict_to_proto(session_id: str, verdict: Verdict) -> target_pb2.VerifyResult:
    return target_pb2.VerifyResult(
        session_id=session_id, accepted=verdict.accepted, next_token=verdict.next_token, features=features_to_proto(verdict.features),
        logprobs=logprobs_to_proto(verdict.logprobs), accepted_path=verdict.path,
    )


def verdict_from_proto(result: target_pb2.VerifyResult) -> Verdict:
    features = features_from_proto(result.features, result.HasField("features"), "features")
    logprobs = logprobs_from_proto(result.logprobs, result.HasField("logprobs"), "logprobs")
    path = tuple(result.accepted_path) if result.accepted_path else None
    return Verdict(accepted=result.accepted, next_token=result.next_token, features=features, logprobs=logprobs, path=path)


def propose_item_to_proto(work: ProposeWork) -> draft_pb2.ProposeItem:
    return draft_pb2.ProposeItem(
        session_id=work.session_id,
        prefix_len=work.prefix_len,
        tokens=work.tokens,
        num_speculative_tokens=work.num_speculative_tokens,
        sampling=sampling_to_proto(work.sampling),
        uniforms=work.uniforms,
        features=features_to_proto(work.features),
        tree_branching=work.tree.branching if work.tree else (),
        tree_max_nodes=work.tree.max_nodes if work.tree else 0,
    )


def propose_item_from_proto(item: draft_pb2.ProposeItem, index: int) -> ProposeWork:
    prefix = f"items[{index}]."
    return ProposeWork(
        session_id=item.session_id,
        prefix_len=item.prefix_len,
        tokens=list(item.tokens),
        num_speculative_tokens=item.num_speculative_tokens,
        sampling=sampling_from_proto(item.sampling, prefix + "sampling."),
        uniforms=list(item.uniforms),
        features=features_from_proto(item.features, item.HasField("features"), prefix + "features"),
        tree=TreeShape(tuple(item.tree_branching), item.tree_max_nodes) if item.tree_branching else None,
    )


def proposal_to_proto(session_id: str, proposal: Proposal) -> draft_pb2.Proposal:
    return draft_pb2.Proposal(
        session_id=session_id,
        draft_tokens=proposal.tokens,
        draft_probs=[distribution_to_proto(d) for d in proposal.distributions or []],
        draft_parents=proposal.parents,
    )


def proposal_from_proto(message: draft_pb2.Proposal) -> Proposal:
    return Proposal(tokens=list(message.draft_tokens), distributions=_distributions(message.draft_probs, "draft_probs"),
                    parents=list(message.draft_parents) or None)


def model_info_to_proto(info: ModelInfo) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(
        model=info.model,
        vocab_size=info.vocab_size,
        vocab_fingerprint=info.vocab_fingerprint,
        max_context=info.max_context,
        eos_token_ids=info.eos_token_ids,
        max_speculative_tokens=info.max_speculative_tokens,
        active_sessions=info.active_sessions,
        cache_bytes=info.cache_bytes,
        device=info.device,
        forward_cost_tokens=[tokens for tokens, _ in info.forward_cost],
        forward_cost_seconds=[seconds for _, seconds in info.forward_cost],
        weight_format=info.weight_format,
        weight_format_reason=info.weight_format_reason,
        feature_layers=info.feature_layers,
    )


def model_info_from_proto(message: common_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        model=message.model,
        vocab_size=message.vocab_size,
        vocab_fingerprint=message.vocab_fingerprint,
        max_context=message.max_context,
        eos_token_ids=tuple(message.eos_token_ids),
        max_speculative_tokens=message.max_speculative_tokens,
        active_sessions=message.active_sessions,
        cache_bytes=message.cache_bytes,
        device=message.device,
        forward_cost=tuple(zip(message.forward_cost_tokens, message.forward_cost_seconds)),
        weight_format=message.weight_format,
        weight_format_reason=message.weight_format_reason,
        feature_layers=tuple(message.feature_layers),
    )
