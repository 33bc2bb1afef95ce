"""Which corpus an expert was shown to help on: a small sketch of a corpus's documents.

An expert's gate (:func:`routerretriever.policy.scoped_declines`) is evidence about queries
searched against one corpus: on the paper's pool, SciFact's expert pays on SciFact's corpus and
costs MED two points on MED's (docs/results.md). A router that keeps an expert only on the
corpora its evidence came from needs to recognise those corpora later, in another process, after
documents were added or removed. A :class:`CorpusSketch` is a bottom-k MinHash of the documents
(id, title and text; the ``k`` smallest 64-bit hashes): two sketches estimate the Jaccard
similarity of their document sets, exactly when both corpora have at most ``k`` documents. Ids
alone would not do: collections numbered 1, 2, 3 ... (Cranfield, CISI, MED) would look alike.
A corpus with some documents added, removed or edited is the same corpus while most are shared.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from routerretriever.data import Corpus, Document

SKETCH_SIZE = 256  # hashes kept: Jaccard estimated to about ±0.03 (one SD at J = 0.5)
SAME_CORPUS = 0.5  # estimated Jaccard from which two corpora count as one


def _hash(doc_id: str, doc: Document) -> int:
    h = hashlib.blake2b(digest_size=8)
    for part in (doc_id, doc.title, doc.text):
        h.update(part.encode())
        h.update(b"\0")
    return int.from_bytes(h.digest(), "little")


@dataclass(frozen=True)
class CorpusSketch:
    """The :data:`SKETCH_SIZE` smallest hashes of a corpus's documents, and how many it has."""

    hashes: tuple[int, ...]
    size: int

    @classmethod
    def of(cls, corpus: Corpus) -> CorpusSketch:
        hashes = np.unique(np.fromiter((_hash(i, d) for i, d in corpus.items()), dtype=np.uint64))
        return cls(tuple(int(h) for h in hashes[:SKETCH_SIZE]), len(hashes))

    def similarity(self, other: CorpusSketch) -> float:
        """Estimated Jaccard similarity of the two document sets (exact for corpora of at most
        :data:`SKETCH_SIZE` documents)."""
        # The SKETCH_SIZE smallest hashes of the union: each is in a corpus exactly when it is in
        # that corpus's sketch, so the share found in both estimates the Jaccard similarity.
        if not self.hashes and not other.hashes:
            return 1.0
        union = sorted(set(self.hashes) | set(other.hashes))[:SKETCH_SIZE]
        both = set(self.hashes) & set(other.hashes)
        return sum(h in both for h in union) / len(union)

    def matches(self, other: CorpusSketch) -> bool:
        """The same corpus, give or take some added, removed or edited documents
        (:data:`SAME_CORPUS`)."""
        return self.similarity(other) >= SAME_CORPUS

    def to_json(self) -> dict[str, Any]:
        # hex strings: 64-bit integers do not survive every JSON reader
        return {"size": self.size, "hashes": [f"{h:016x}" for h in self.hashes]}

    @classmethod
    def from_json(cls, spec: Any) -> CorpusSketch:
        """Inverse of :meth:`to_json`; a malformed spec is a ``ValueError`` naming the field."""
        if not isinstance(spec, dict):
            raise ValueError("a corpus sketch must be an object with 'size' and 'hashes'")
        size, hashes = spec.get("size"), spec.get("hashes")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError("corpus sketch 'size' must be a non-negative integer")
        if not isinstance(hashes, list) or len(hashes) > min(size, SKETCH_SIZE):
            raise ValueError(
                f"corpus sketch 'hashes' must be a list of at most 'size' and {SKETCH_SIZE} entries"
            )
        try:
            values = tuple(int(h, 16) for h in hashes)
        except (TypeError, ValueError):
            raise ValueError("corpus sketch 'hashes' must be hexadecimal strings") from None
        if any(not 0 <= h < 2**64 for h in values) or list(values) != sorted(set(values)):
            raise ValueError("corpus sketch 'hashes' must be distinct, sorted 64-bit values")
        return cls(values, size)


@dataclass(frozen=True)
class CorpusScope:
    """Where each expert was shown to help: named corpora and, per expert, the names of those it
    may be used on. An expert the scope does not name is not limited by it (e.g. one added to a
    server later, which no gate has measured)."""

    corpora: dict[str, CorpusSketch]
    experts: dict[str, tuple[str, ...]]

    def __post_init__(self) -> None:
        unknown = sorted({c for cs in self.experts.values() for c in cs} - set(self.corpora))
        if unknown:
            raise ValueError(f"corpus scope names corpora it has no sketch of: {unknown}")

    def excluded(self, corpus: CorpusSketch) -> list[str]:
        """The experts the scope names that may not be used on ``corpus``."""
        here = {name for name, s in self.corpora.items() if s.matches(corpus)}
        return [e for e, cs in self.experts.items() if not here & set(cs)]

    def to_json(self) -> dict[str, Any]:
        return {
            "corpora": {n: s.to_json() for n, s in self.corpora.items()},
            "experts": {e: list(cs) for e, cs in self.experts.items()},
        }

    @classmethod
    def from_json(cls, spec: Any) -> CorpusScope:
        """Inverse of :meth:`to_json`; a malformed spec is a ``ValueError`` naming the field."""
        if not isinstance(spec, dict) or not isinstance(spec.get("corpora"), dict):
            raise ValueError("scope must be an object with 'corpora' and 'experts'")
        experts = spec.get("experts")
        if not isinstance(experts, dict) or not all(
            isinstance(cs, list) and all(isinstance(c, str) for c in cs) for cs in experts.values()
        ):
            raise ValueError("scope 'experts' must map each expert to a list of corpus names")
        corpora = {}
        for name, s in spec["corpora"].items():
            try:
                corpora[str(name)] = CorpusSketch.from_json(s)
            except ValueError as e:
                raise ValueError(f"scope corpus {str(name)[:40]!r}: {e}") from None
        return cls(corpora, {str(e): tuple(cs) for e, cs in experts.items()})
