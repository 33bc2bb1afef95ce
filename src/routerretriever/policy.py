"""How a routed retriever weighs its pool's dense members for each query.

A policy maps each query's routing embedding (the base model's) to weights over the pool's
dense members (``"__base__"`` and experts): one member with weight 1 is the paper's hard routing;
several are a mixture, searched in one index search (:mod:`routerretriever.fusion`).

- :class:`PilotPolicy`: the paper's pilots (Algorithm 1) pick one expert; ``base_mix`` moves
  that much weight onto the base model's vector, a hedge that costs no extra pass; queries routed
  to an expert in ``decline`` (one that did not measurably beat the base model, see
  :func:`declined_experts`) get the base model's vector instead, which costs no pass at all.
- :class:`NeighbourPolicy`: each member's expected nDCG@10 is the similarity-weighted mean of
  its scores on the ``k`` nearest training instances; weights are a softmax of those expectations
  over the ``top`` best members (``top = 1``: route to the member expected to score best, which
  may be the base model, so a harmful expert can be declined).

Both are pure numpy and save to a folder (safetensors + JSON).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from routerretriever.corpora import CorpusScope, CorpusSketch
from routerretriever.errors import ModelError
from routerretriever.files import atomic_write
from routerretriever.pilots import PilotLibrary
from routerretriever.router import RULES, Rule, expected_scores, expert_scores

BASE = "__base__"  # the base model as a pool member (same name as encoder.BASE)
MIN_GATE = 10  # held-out instances an expert needs before it can be kept


class Policy(Protocol):
    """Member weights for each query."""

    @property
    def members(self) -> list[str]: ...

    def weights(self, query_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(W, scores)``: weights ``(n, m)`` over :attr:`members` (rows sum to 1) and the
        routing scores ``(n, m)`` behind them (for explanations)."""
        ...

    def save(self, folder: Path) -> dict[str, Any]: ...


def _softmax_top(pred: np.ndarray, temperature: float, top: int) -> np.ndarray:
    """softmax(pred / temperature) kept on each row's ``top`` largest entries, renormalised."""
    z = pred / temperature
    z = z - z.max(axis=1, keepdims=True)
    w = np.exp(z)  # (n, m)
    if top < pred.shape[1]:
        cut = np.argsort(-pred, axis=1, kind="stable")[:, top:]
        np.put_along_axis(w, cut, 0.0, axis=1)
    return w / w.sum(axis=1, keepdims=True)


@dataclass
class PilotPolicy:
    """One expert by the pilot library (``rule`` as in :func:`routerretriever.router.route`),
    with ``base_mix`` of the weight moved onto the base model's vector; a query whose expert is
    in ``decline`` goes to the base model alone. With a ``scope``, the policy is for no corpus
    in particular: :meth:`on_corpus` gives the one to route with on a given corpus."""

    pilots: PilotLibrary
    rule: Rule = "weighted"
    base_mix: float = 0.0
    decline: tuple[str, ...] = ()
    scope: CorpusScope | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown routing rule {self.rule!r}; use one of {list(RULES)}")
        if not 0.0 <= self.base_mix <= 1.0:
            raise ValueError(f"base_mix must be in [0, 1], got {self.base_mix}")
        unknown = sorted(set(self.decline) - set(self.pilots.experts))
        if unknown:
            raise ValueError(f"decline names experts without pilots: {unknown}")
        self.decline = tuple(self.decline)

    @property
    def members(self) -> list[str]:
        pool = list(self.pilots.experts)
        hedged = self.base_mix or self.decline or self.scope is not None
        return pool if BASE in pool or not hedged else [*pool, BASE]

    def on_corpus(self, corpus: CorpusSketch) -> PilotPolicy:
        """This policy as it routes queries searched against ``corpus``: every expert its scope
        does not allow there is declined too (no scope: this policy itself)."""
        if self.scope is None:
            return self
        out = [e for e in self.scope.excluded(corpus) if e in self.pilots.experts]
        return PilotPolicy(
            self.pilots, self.rule, self.base_mix, tuple(dict.fromkeys([*self.decline, *out]))
        )

    @property
    def layers(self) -> int | None:
        return self.pilots.layers

    @property
    def base_only(self) -> bool:
        """Every query gets the base model alone (all weight moved to it, or every expert
        declined): the routing pass is then the whole answer."""
        experts = set(self.pilots.experts) - {BASE}
        return self.base_mix >= 1.0 or experts <= set(self.decline)

    def weights(self, query_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = expert_scores(query_emb, self.pilots, self.rule)  # (n, T)
        members = self.members
        best = scores.argmax(axis=1)  # (n,)
        w = np.zeros((len(query_emb), len(members)))  # (n, m)
        w[np.arange(len(query_emb)), best] = 1.0 - self.base_mix
        if self.base_mix:
            w[:, members.index(BASE)] += self.base_mix
        if self.decline:
            out = np.isin(best, [members.index(e) for e in self.decline])
            w[out] = 0.0
            w[out, members.index(BASE)] = 1.0
        full = np.full((len(query_emb), len(members)), -np.inf)
        full[:, : scores.shape[1]] = scores
        return w, full

    def save(self, folder: Path) -> dict[str, Any]:
        self.pilots.save(folder / "pilots")
        spec = {
            "kind": "pilots",
            "rule": self.rule,
            "base_mix": self.base_mix,
            "decline": list(self.decline),
        }
        return spec | ({"scope": self.scope.to_json()} if self.scope is not None else {})


@dataclass
class NeighbourPolicy:
    """Expected-gain weights from the ``k`` nearest training instances.

    ``embeddings`` ``(N, d)``: the instances' base embeddings; ``scores`` ``(N, m)``: each
    member's nDCG@10 on each instance.
    """

    members: list[str]
    embeddings: np.ndarray
    scores: np.ndarray
    k: int = 80
    tau: float = 0.05
    temperature: float = 0.05
    top: int = 1

    def __post_init__(self) -> None:
        if self.scores.shape != (len(self.embeddings), len(self.members)):
            raise ValueError(
                f"scores must have shape ({len(self.embeddings)}, {len(self.members)}), "
                f"got {self.scores.shape}"
            )
        if not 1 <= self.top <= len(self.members):
            raise ValueError(f"top must be in [1, {len(self.members)}], got {self.top}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        self.k = min(self.k, len(self.embeddings))
        # As saved, so a loaded policy decides exactly as the one that was saved.
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        self.scores = np.asarray(self.scores, dtype=np.float32)

    layers = None  # routes in the base model's sentence-embedding space

    @property
    def base_only(self) -> bool:
        """The pool is the base model alone."""
        return self.members == [BASE]

    def weights(self, query_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pred = expected_scores(query_emb, self.embeddings, self.scores, self.k, self.tau)  # (n, m)
        return _softmax_top(pred, self.temperature, self.top), pred

    def save(self, folder: Path) -> dict[str, Any]:
        from safetensors.numpy import save_file

        def write(tmp: Path) -> None:
            save_file(
                {
                    "embeddings": np.ascontiguousarray(self.embeddings, dtype=np.float32),
                    "scores": np.ascontiguousarray(self.scores, dtype=np.float32),
                },
                str(tmp),
            )

        atomic_write(folder / "neighbours.safetensors", write)
        return {
            "kind": "neighbours",
            "members": self.members,
            "k": self.k,
            "tau": self.tau,
            "temperature": self.temperature,
            "top": self.top,
        }


def declined_experts(
    routed: Sequence[str], gains: np.ndarray, experts: Sequence[str], level: float = 0.05
) -> tuple[str, ...]:
    """The experts a :class:`PilotPolicy` should decline: those whose held-out instances routed
    to them (``routed[i]``, with ``gains[i]`` = the expert's nDCG@10 minus the base model's on
    instance ``i``, both as the system searches) do not show a positive mean gain at one-sided
    significance ``level`` (paired t-test; fewer than :data:`MIN_GATE` instances: declined).

    A resemblance router sends most of a domain's queries to that domain's expert whether it
    helps or not; this keeps an expert only where it measurably pays.
    """
    from scipy import stats

    routed_arr = np.asarray(routed)
    gains = np.asarray(gains, dtype=np.float64)
    if routed_arr.shape != gains.shape:
        raise ValueError(f"routed and gains differ in length: {routed_arr.shape} vs {gains.shape}")
    out = []
    for e in experts:
        g = gains[routed_arr == e]
        if len(g) < MIN_GATE or g.mean() <= 0:
            out.append(e)
        elif np.ptp(g) > 1e-12 and stats.ttest_1samp(g, 0.0, alternative="greater").pvalue >= level:
            out.append(e)  # (a constant positive gain is kept)
    return tuple(out)


def scoped_declines(
    routed: Sequence[str],
    gains: np.ndarray,
    corpora: Sequence[str],
    experts: Sequence[str],
    level: float = 0.05,
) -> dict[str, tuple[str, ...]]:
    """:func:`declined_experts` on each corpus's instances apart (``corpora[i]``: the corpus
    instance ``i`` was searched against): corpus name -> the experts declined there.

    An expert's gain is evidence about the corpus it was measured on: on the paper's pool,
    SciFact's expert gains on SciFact's corpus and, routed MED's queries, costs MED's two points
    (docs/results.md). Pooled, the first hides the second; apart, each corpus keeps only what
    paid on it, and a corpus with no evidence keeps nothing.
    """
    corpora_arr = np.asarray(corpora)
    routed_arr = np.asarray(routed)
    gains = np.asarray(gains, dtype=np.float64)
    if not corpora_arr.shape == routed_arr.shape == gains.shape:
        raise ValueError("routed, gains and corpora differ in length")
    return {
        str(c): declined_experts(
            routed_arr[corpora_arr == c], gains[corpora_arr == c], experts, level
        )
        for c in dict.fromkeys(corpora_arr.tolist())
    }


def load_policy(folder: Path, spec: dict[str, Any]) -> PilotPolicy | NeighbourPolicy:
    """Inverse of a policy's ``save``: ``spec`` is what it returned."""
    kind = spec.get("kind")
    if kind == "pilots":
        scope = spec.get("scope")
        return PilotPolicy(
            PilotLibrary.load(folder / "pilots"),
            spec["rule"],
            spec["base_mix"],
            tuple(spec.get("decline", ())),
            None if scope is None else CorpusScope.from_json(scope),
        )
    if kind == "neighbours":
        from safetensors.numpy import load_file

        try:
            arrays = load_file(str(folder / "neighbours.safetensors"))
        except Exception as e:  # safetensors' own error type, or a missing file
            raise ModelError(f"{folder}: cannot read neighbours.safetensors ({e})") from None
        return NeighbourPolicy(
            list(spec["members"]),
            arrays["embeddings"],
            arrays["scores"],
            int(spec["k"]),
            float(spec["tau"]),
            float(spec["temperature"]),
            int(spec["top"]),
        )
    raise ValueError(f"{folder}: unknown routing policy {kind!r}; known: pilots, neighbours")
