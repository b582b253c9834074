"""Drafting from the target's own features (see feature_net.py for the networks).

The target returns, with every Verify, its features of the positions it committed; the
orchestrator passes them on with the next Propose. Per session a drafter holds the features of
positions 0..n-1 (never of rejected drafts: the target sends only committed ones), and proposes
when they reach the position before the sequence's last token, the one the target has not scored:
from f_{n-1} and that token it predicts the next one. A session short of features (its first
round, before any Verify) gets no proposal.

- `ChainDrafter` keeps a KV cache of its own decoder layer: entries 0..n-1 come from true
  features, and a proposal appends K - 1 entries of its own predicted features, which the next
  round's rollback drops before the new true features go in.
- `MultiTokenDrafter` needs no cache: its K heads read f_{n-1} and the last token at once.

Tokens are drawn like a model drafter's (`model.draw`: argmax, or the warped q cut to its
`max_support` most probable tokens), over the draft vocabulary of the net's head.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from draft_service.drafters import feature_net
from draft_service.drafters.base import Drafter, DraftSession
from draft_service.drafters.feature_net import ChainNet, MultiTokenNet
from draft_service.drafters.model import draw
from specdec import sampling, weights
from specdec.lm import SequenceCache
from specdec.messages import Features, Proposal, ProposeWork
from specdec.models import EMBEDDED, LoadedModel, resolve


@dataclass
class FeatureState:
    held: int = 0  # positions whose features were received
    unread: list[torch.Tensor] = field(default_factory=list)  # received rows not yet fed, oldest first [n, W] each
    cache: SequenceCache = field(default_factory=SequenceCache)  # ChainDrafter: entries of positions 0..
    # the latest prediction at position held - 1 [H] (ChainDrafter), its feature [W] (MultiTokenDrafter)
    last: torch.Tensor | None = None


class FeatureDrafter(Drafter):
    samples = True

    def __init__(self, net, target: LoadedModel, name: str, max_support: int = 64):
        """`net`: a trained ChainNet or MultiTokenNet on `target`'s embedding and head."""
        self.net = net.eval()
        self.name = name
        self.vocab_size = target.vocab_size
        self.tokenizer = target.tokenizer
        self.eos_token_ids = target.eos_token_ids
        self.vocab_fingerprint = target.vocab_fingerprint
        self.max_support = max_support
        self.feature_layers = net.config.feature_layers
        self.feature_width = net.config.feature_width
        self.weight_format = "float32"
        self.weight_format_reason = ""

    def start(self, session: DraftSession) -> None:
        session.state = FeatureState()

    def features_held(self, session: DraftSession) -> int:
        return session.state.held

    def receive(self, session: DraftSession, features: Features) -> None:
        session.state.unread.append(features.rows)
        session.state.held = features.end

    def rollback(self, session: DraftSession, length: int) -> None:
        """Drop the entries of the last proposal's own predictions (every received row has been
        fed by then: `propose` reads them all)."""
        state = session.state
        if length < state.held:  # the caller went back before features it sent: forget them
            state.held, state.last = length, None
        state.cache.truncate(state.held)

    def state_bytes(self, session: DraftSession) -> int:
        state = session.state
        return (state.cache.nbytes + sum(r.numel() * r.element_size() for r in state.unread)) if state is not None else 0

    def _ready(self, session: DraftSession) -> bool:
        return session.state.held == len(session.ids) - 1

    def _draw(self, logits: torch.Tensor, work: ProposeWork, step: int, proposal: Proposal, session: DraftSession) -> int:
        token = draw(logits, work, step, proposal, self.max_support, self.net.vocabulary, session.history(proposal.tokens), self.vocab_size,
                     session.allowed())
        session.drafted(token)
        return token

    def _round_seconds(self, context: int = 64, k: int = 4, repeats: int = 5) -> float:
        """The fastest of `repeats` greedy K-token proposals over `context` positions."""
        session = DraftSession(ids=[i % self.vocab_size for i in range(context + 1)])
        self.start(session)
        self.receive(session, Features(0, torch.zeros(context, self.feature_width, dtype=torch.bfloat16)))
        fastest = float("inf")
        for _ in range(repeats):
            self.rollback(session, len(session.ids))
            started = time.perf_counter()
            self.propose([session], [ProposeWork("warm-up", len(session.ids), [], k, sampling.GREEDY, [])])
            fastest = min(fastest, time.perf_counter() - started)
        return fastest

    def warm_up(self) -> None:
        """The fastest weight format for a K = 4 proposal on this machine (timed; the draft's
        format never changes the output, only its speed), then one proposal."""
        timed = {}
        for format in weights.candidates(torch.device("cpu")):
            if all(weights.supported(format, m.weight) for m in self.net.modules() if isinstance(m, torch.nn.Linear)):
                self.net.use_format(format)
                timed[format] = self._round_seconds()
        best = min(timed, key=timed.get)
        self.net.use_format(best)
        self.weight_format = best
        self.weight_format_reason = f"feature drafter ({self.net.config.kind}); K = 4 proposal: " + ", ".join(
            f"{f} {1000 * s:.1f} ms" for f, s in timed.items()
        )
        self._round_seconds(repeats=1)


class ChainDrafter(FeatureDrafter):
    @torch.inference_mode()
    def propose(self, sessions: list[DraftSession], work: list[ProposeWork]) -> tuple[list[Proposal], int]:
        net: ChainNet = self.net
        proposals = [Proposal([], None if w.sampling.deterministic else []) for w in work]
        rows, inputs = [], []
        for i, session in enumerate(sessions):  # the unread true features go in, with the tokens after them
            state = session.state
            if state.unread:
                fed = state.cache.length
                unread = torch.cat(state.unread).float()  # [n, W]
                state.unread = []
                inputs.append(net.fused(net.reduced(unread), torch.tensor(session.ids[fed + 1 : fed + 1 + len(unread)])))
                rows.append(i)
        predicted = dict(zip(rows, (p[-1] for p in net.extend([sessions[i].state.cache for i in rows], inputs)))) if rows else {}
        passes = 1 if rows else 0
        for i, session in enumerate(sessions):
            state = session.state
            if i not in predicted and self._ready(session) and state.last is not None:
                predicted[i] = state.last  # no new features (a retried round): the kept prediction
            if i in predicted:
                state.last = predicted[i]
        active = [i for i in range(len(sessions)) if self._ready(sessions[i]) and i in predicted]
        for step in range(max((work[i].num_speculative_tokens for i in active), default=0)):
            rows = [i for i in active if work[i].num_speculative_tokens > step]
            logits = net.logits(torch.stack([predicted[i] for i in rows]))  # [rows, V']
            tokens = [self._draw(logits[r], work[i], step, proposals[i], sessions[i]) for r, i in enumerate(rows)]
            for i, token in zip(rows, tokens):
                proposals[i].tokens.append(token)
            rows = [(i, t) for i, t in zip(rows, tokens) if work[i].num_speculative_tokens > step + 1]
            if not rows:
                break
            own = [net.fused(feature_net.own_input(predicted[i][None], net.config.eps), torch.tensor([t])) for i, t in rows]
            outputs = net.extend([sessions[i].state.cache for i, _ in rows], own)
            passes += 1
            for (i, _), out in zip(rows, outputs):
                predicted[i] = out[-1]
        return proposals, passes


class MultiTokenDrafter(FeatureDrafter):
    @torch.inference_mode()
    def propose(self, sessions: list[DraftSession], work: list[ProposeWork]) -> tuple[list[Proposal], int]:
        net: MultiTokenNet = self.net
        proposals = [Proposal([], None if w.sampling.deterministic else []) for w in work]
        for session in sessions:
            state = session.state
            if state.unread:
                state.last = state.unread[-1][-1].float()
                state.unread = []
        active = [i for i, s in enumerate(sessions) if self._ready(s) and s.state.last is not None]
        if not active:
            return proposals, 0
        features = torch.stack([sessions[i].state.last for i in active])  # [B, W]
        heads = net.predicted(features, torch.tensor([sessions[i].ids[-1] for i in active]))  # per head [B, H]
        for step, predicted in enumerate(heads):
            rows = [(r, i) for r, i in enumerate(active) if work[i].num_speculative_tokens > step]
            if not rows:
                break
            logits = net.logits(predicted[[r for r, _ in rows]])
            for (r, i), row_logits in zip(rows, logits):
                proposals[i].tokens.append(self._draw(row_logits, work[i], step, proposals[i], sessions[i]))
        return proposals, 1


DRAFTERS = {feature_net.CHAIN: ChainDrafter, feature_net.MULTI_TOKEN: MultiTokenDrafter}


def is_feature_drafter(model: str) -> bool:
    """Whether `model` (a directory, or a shipped draft's name) holds a feature drafter."""
    return model != EMBEDDED and (Path(resolve(model)) / feature_net.CONFIG_FILE).is_file()


def trained_on(model: str) -> str:
    """The target a feature drafter was trained on (its features and head)."""
    return feature_net.read_config(Path(resolve(model))).target


def load_feature_drafter(model: str, target: LoadedModel, max_support: int = 64) -> FeatureDrafter:
    directory = Path(resolve(model))
    net = feature_net.load(directory, target.model)
    return DRAFTERS[net.config.kind](net, target, directory.name, max_support)
