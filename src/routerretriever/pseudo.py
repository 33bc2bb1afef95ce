"""Pseudo-queries made from a corpus alone, so any corpus can have an expert.

Two kinds, each paired with the document it came from as the positive:
- title -> body, where a document has a title of a few words;
- Contriever-style independent cropping: a random span of the text, with some words dropped
  (the document side is the frozen base embedding of the whole document, so only the query
  side is cropped).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from routerretriever.data import Corpus, Qrels, Queries


@dataclass(frozen=True)
class PseudoQueryConfig:
    """How many pseudo-queries to make, and of what shape."""

    crops_per_doc: int = 2
    min_words: int = 5
    max_words: int = 16
    word_dropout: float = 0.1  # Contriever drops 10% of tokens from each crop
    use_titles: bool = True
    min_title_words: int = 3
    max_docs: int | None = None  # sample at most this many documents (None: all)

    def __post_init__(self) -> None:
        if self.crops_per_doc < 0:
            raise ValueError(f"crops_per_doc must be >= 0, got {self.crops_per_doc}")
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(
                f"need 1 <= min_words <= max_words, got {self.min_words} and {self.max_words}"
            )
        if not 0.0 <= self.word_dropout < 1.0:
            raise ValueError(f"word_dropout must be in [0, 1), got {self.word_dropout}")


def make_pseudo_queries(
    corpus: Corpus, config: PseudoQueryConfig | None = None, seed: int = 0
) -> tuple[Queries, Qrels]:
    """Pseudo-queries and their qrels (each query judges its source document relevant).

    Query ids are ``"<doc_id>#title"`` and ``"<doc_id>#crop<i>"``. Deterministic for a seed.
    """
    config = config or PseudoQueryConfig()
    rng = random.Random(seed)
    doc_ids = list(corpus)
    if config.max_docs is not None and config.max_docs < len(doc_ids):
        doc_ids = sorted(rng.sample(doc_ids, config.max_docs), key=doc_ids.index)
    queries: Queries = {}
    qrels: Qrels = {}
    for doc_id in doc_ids:
        doc = corpus[doc_id]
        title = doc.title.strip().rstrip(" .")
        if config.use_titles and len(title.split()) >= config.min_title_words:
            queries[f"{doc_id}#title"] = title
            qrels[f"{doc_id}#title"] = {doc_id: 1}
        words = doc.text.split()
        if len(words) < config.min_words:
            continue
        for i in range(config.crops_per_doc):
            length = rng.randint(config.min_words, min(config.max_words, len(words)))
            start = rng.randint(0, len(words) - length)
            span = [w for w in words[start : start + length] if rng.random() >= config.word_dropout]
            if span:
                queries[f"{doc_id}#crop{i}"] = " ".join(span)
                qrels[f"{doc_id}#crop{i}"] = {doc_id: 1}
    return queries, qrels
