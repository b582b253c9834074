"""Greedy acceptance of a feature drafter, replayed offline on held-out target responses.

Under greedy decoding every committed token is the target's own, so the features the target would
send are the ones recorded with its response. The replay drives the serving drafter itself
(`draft_service.drafters.feature`) round by round the way the draft engine does (rollback, the
new features, propose), so it measures the code that serves, not a re-implementation: the first
round is target-only (no features yet), then each round drafts K (at most what is left - 1),
accepts the longest prefix equal to the response and commits one target token more.
"""

from __future__ import annotations

from collections import defaultdict

from distill.evaluate import Replay
from distill.features.corpus import FeatureExample, FeatureStore
from draft_service.drafters.base import DraftSession
from draft_service.drafters.feature import FeatureDrafter
from specdec import sampling
from specdec.messages import Features, ProposeWork


def replay(drafter: FeatureDrafter, store: FeatureStore, example: FeatureExample, k: int) -> Replay:
    ids, start = example.ids, len(example.prompt_ids)
    features = store.features(example)  # [len(ids) - 1, W]
    result = Replay(drafted_at=[0] * k, accepted_at=[0] * k)
    session = DraftSession(ids=ids[: start + 1])  # the first round committed one token at K = 0
    drafter.start(session)
    result.rounds, result.tokens = 1, 1
    while len(session.ids) < len(ids):
        committed = len(session.ids)
        drafter.rollback(session, committed)
        held = drafter.features_held(session)
        drafter.receive(session, Features(held, features[held : committed - 1]))
        drafted = min(k, len(ids) - committed - 1)
        proposal = drafter.propose([session], [ProposeWork(example.key, committed, [], drafted, sampling.GREEDY, [])])[0][0] if drafted else None
        tokens = proposal.tokens if proposal else []
        accepted = 0
        while accepted < len(tokens) and tokens[accepted] == ids[committed + accepted]:
            accepted += 1
        for i in range(len(tokens)):
            result.drafted_at[i] += 1
            result.accepted_at[i] += i < accepted
        result.drafted += len(tokens)
        result.accepted += accepted
        result.rounds += 1
        result.tokens += accepted + 1
        session.ids = ids[: committed + accepted + 1]
    return result


def acceptance_report(drafter: FeatureDrafter, store: FeatureStore, examples: list[FeatureExample], k_values=(4,)) -> dict:
    """{"k4": {"all": summary, source: summary, ...}, ...} (see distill.evaluate.Replay.summary)."""
    report = {}
    for k in k_values:
        by_source: dict[str, Replay] = defaultdict(Replay)
        for example in examples:
            one = replay(drafter, store, example, k)
            by_source["all"].add(one)
            by_source[example.source].add(one)
        report[f"k{k}"] = {source: r.summary() for source, r in sorted(by_source.items())}
    return report
