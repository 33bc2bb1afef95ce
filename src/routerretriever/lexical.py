"""The lexical member of the pool: a BM25 index of the corpus, built once and cached on disk.

Built with ``bm25s`` (Lucene's BM25 by default: ``idf = ln(1 + (N - df + 0.5) / (df + 0.5))``,
``tf / (tf + k1 * (1 - b + b * len / avglen))``, without the constant ``k1 + 1`` factor, as
Lucene 8+ writes it), English stemming and stopwords by
default. The index is stored beside the embedding cache under ``bm25/``, keyed by the corpus
fingerprint and the BM25 settings, written as one folder that is renamed into place only when
complete (a killed build leaves nothing that reads as valid), and loaded memory-mapped.

Departs from a search engine in one way: a query whose words are all unknown to the corpus gets
no hits (rather than arbitrary zero-score documents), so fusion treats it as lexically silent.

Optional pseudo-relevance feedback (RM3's expansion, Abdul-Jaleel et al. 2004): with
``feedback_docs = k`` the query's ``k`` best documents give each of their words ``p(w|F)``, its
share of each document's words averaged over the ``k``; the ``feedback_terms`` likeliest words
join the query with ``feedback_weight`` of the weight, the query's own words keeping the rest.
Documents are always counted by the index, so the expansion costs one more scoring pass.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from routerretriever.config import settings_from
from routerretriever.data import Corpus
from routerretriever.files import atomic_dir, default_cache_dir
from routerretriever.index import Hits

logger = logging.getLogger(__name__)

Method = Literal["lucene", "robertson", "atire", "bm25l", "bm25+"]
METHODS: tuple[str, ...] = ("lucene", "robertson", "atire", "bm25l", "bm25+")
FORMAT_VERSION = 2  # 2: adds each document's word counts (feedback)


@dataclass(frozen=True)
class BM25Config:
    """BM25 settings. ``stemmer`` names a PyStemmer language (``None``: no stemming);
    ``stopwords`` a bm25s stopword list such as ``"en"`` (``None``: keep every word).
    ``feedback_docs`` > 0 turns on query expansion from that many top documents (module
    docstring); the feedback settings apply at query time and do not change the index."""

    k1: float = 1.5
    b: float = 0.75
    method: Method = "lucene"
    stemmer: str | None = "english"
    stopwords: str | None = "en"
    feedback_docs: int = 0
    feedback_terms: int = 10
    feedback_weight: float = 0.1

    def __post_init__(self) -> None:
        if not (isinstance(self.k1, int | float) and 0 <= self.k1 <= 100):
            raise ValueError(f"bm25 k1 must be a number in [0, 100], got {self.k1!r}")
        if not (isinstance(self.b, int | float) and 0 <= self.b <= 1):
            raise ValueError(f"bm25 b must be a number in [0, 1], got {self.b!r}")
        if self.method not in METHODS:
            raise ValueError(f"bm25 method must be one of {list(METHODS)}, got {self.method!r}")
        for name, top in (("feedback_docs", 1000), ("feedback_terms", 1000)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= top:
                raise ValueError(f"bm25 {name} must be an integer in [0, {top}], got {v!r}")
        w = self.feedback_weight
        if isinstance(w, bool) or not (isinstance(w, int | float) and 0 <= w <= 1):
            raise ValueError(f"bm25 feedback_weight must be a number in [0, 1], got {w!r}")

    @property
    def feedback(self) -> bool:
        """Whether queries are expanded from their top documents."""
        return self.feedback_docs > 0 and self.feedback_terms > 0 and self.feedback_weight > 0

    @property
    def fingerprint(self) -> str:
        """Names the index these settings build (the query-time feedback settings do not)."""
        index = {k: v for k, v in asdict(self).items() if not k.startswith("feedback_")}
        text = json.dumps(index, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _bm25s() -> Any:
    """The ``bm25s`` module. On import it sets its logger to DEBUG, which lets its per-call
    debug lines through any application's handler; the level is handed back to the application."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.NOTSET)
    return bm25s


def _stemmer(name: str | None) -> Any:
    if name is None:
        return None
    import Stemmer

    try:
        return Stemmer.Stemmer(name).stemWords
    except KeyError:
        raise ValueError(f"unknown stemmer {name!r}; available: {Stemmer.algorithms()}") from None


def tokenize(texts: Sequence[str], config: BM25Config) -> list[list[str]]:
    """Lower-cased, stopword-free, stemmed word lists, as the index sees them."""
    bm25s = _bm25s()
    if not texts:
        return []
    # Lone surrogates cannot be stemmed or saved; they carry no word, so drop them.
    clean = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]
    out = bm25s.tokenize(
        clean,
        lower=True,
        stopwords=config.stopwords,
        stemmer=_stemmer(config.stemmer),
        return_ids=False,
        show_progress=False,
    )
    return [list(words) for words in out]


class LexicalIndex(Protocol):
    """What fusion needs of a lexical backend: :class:`BM25Index`, or a Milvus collection's own
    BM25 full-text search (:meth:`routerretriever.index.MilvusIndex.lexical`)."""

    def search(
        self, queries: Sequence[str], k: int, exclude_ids: Sequence[str | None] | None = None
    ) -> list[Hits]: ...

    def search_with_stats(
        self, queries: Sequence[str], k: int, exclude_ids: Sequence[str | None] | None = None
    ) -> tuple[list[Hits], np.ndarray | None]:
        """``search``, and each query's score mean and deviation over the whole corpus
        ``(n, 2)`` for z-score fusion (``None`` where the backend does not know them)."""
        ...


class DocTerms:
    """Each document's word counts (token ids of the index's vocabulary), as CSR arrays:
    document ``j``'s words are ``terms[indptr[j]:indptr[j + 1]]``. Feedback reads them."""

    FILES = ("doc_indptr.npy", "doc_terms.npy", "doc_counts.npy")

    def __init__(self, indptr: np.ndarray, terms: np.ndarray, counts: np.ndarray) -> None:
        if len(indptr) < 1 or indptr[-1] != len(terms) or len(terms) != len(counts):
            raise ValueError("inconsistent document word counts")
        self.indptr, self.terms, self.counts = indptr, terms, counts

    def __len__(self) -> int:
        return len(self.indptr) - 1

    @classmethod
    def count(cls, words: Sequence[Sequence[str]], vocab: dict[str, int]) -> DocTerms:
        rows = [np.unique([vocab[w] for w in doc], return_counts=True) for doc in words]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(t) for t, _ in rows])
        empty = np.zeros(0, dtype=np.int64)
        terms = np.concatenate([t for t, _ in rows] or [empty]).astype(np.int32)
        counts = np.concatenate([c for _, c in rows] or [empty]).astype(np.int32)
        return cls(indptr, terms, counts)

    def row(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.indptr[j]), int(self.indptr[j + 1])
        return self.terms[a:b], self.counts[a:b]

    def save(self, folder: Path) -> None:
        for name, a in zip(self.FILES, (self.indptr, self.terms, self.counts), strict=True):
            np.save(folder / name, a, allow_pickle=False)

    @classmethod
    def load(cls, folder: Path, mmap: bool) -> DocTerms:
        mode: Literal["r"] | None = "r" if mmap else None
        arrays = [np.load(folder / n, mmap_mode=mode, allow_pickle=False) for n in cls.FILES]
        return cls(*arrays)


class BM25Index:
    """BM25 over a fixed corpus: ``search`` gives the top-k ``(doc_id, score)`` per query.

    Example::

        index = BM25Index.build(corpus)          # or BM25Index.cached(corpus) to reuse disk
        index.search(["statin therapy"], k=3)     # [[('d12', 7.1), ('d3', 5.4), ...]]
    """

    def __init__(self, ids: list[str], model: Any, config: BM25Config, doc_terms: DocTerms) -> None:
        self.ids = ids
        self.config = config
        self._model = model
        self._doc_terms = doc_terms
        self._id_pos = {d: i for i, d in enumerate(ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, corpus: Corpus, config: BM25Config | None = None) -> BM25Index:
        """Index ``corpus`` (title and text, as the dense side sees them) in memory."""
        bm25s = _bm25s()
        config = config or BM25Config()
        ids = list(corpus)
        if not ids:
            raise ValueError("cannot build a BM25 index of an empty corpus")
        words = tokenize([d.full_text for d in corpus.values()], config)
        model = bm25s.BM25(k1=config.k1, b=config.b, method=config.method)
        model.index(words, show_progress=False)
        return cls(ids, model, config, DocTerms.count(words, model.vocab_dict))

    def save(self, folder: str | Path) -> Path:
        """Write the index into ``folder`` atomically (bm25s's files plus ``ids.json``)."""

        def fill(tmp: Path) -> None:
            self._model.save(str(tmp), show_progress=False)
            self._doc_terms.save(tmp)
            (tmp / "ids.json").write_text(json.dumps(self.ids))
            manifest = {"version": FORMAT_VERSION, "config": asdict(self.config)}
            (tmp / "routerretriever-bm25.json").write_text(json.dumps(manifest) + "\n")

        return atomic_dir(Path(folder), fill)

    @classmethod
    def load(cls, folder: str | Path, mmap: bool = True) -> BM25Index:
        """Inverse of :meth:`save`; the score arrays are memory-mapped unless ``mmap=False``."""
        bm25s = _bm25s()
        folder = Path(folder)
        manifest_file = folder / "routerretriever-bm25.json"
        if not manifest_file.is_file():
            raise ValueError(f"{folder}: not a saved BM25 index (no {manifest_file.name})")
        try:
            manifest = json.loads(manifest_file.read_text())
            version = manifest.get("version") if isinstance(manifest, dict) else None
            if version != FORMAT_VERSION:
                raise ValueError(f"BM25 index format {str(version)[:20]} unknown")
            config = settings_from(BM25Config, manifest.get("config"), "its config")
            ids = json.loads((folder / "ids.json").read_text())
            if not (isinstance(ids, list) and all(isinstance(d, str) for d in ids)):
                raise ValueError("ids.json is not a list of document ids")
            model = bm25s.BM25.load(str(folder), mmap=mmap, show_progress=False)
            doc_terms = DocTerms.load(folder, mmap)
        except OSError:
            raise
        except Exception as e:  # bm25s's and numpy's own errors on damaged arrays too
            raise ValueError(f"{folder}: cannot read the BM25 index ({e})") from None
        if model.scores["num_docs"] != len(ids):
            raise ValueError(f"{folder}: {len(ids)} ids but {model.scores['num_docs']} documents")
        if len(doc_terms) != len(ids):
            raise ValueError(f"{folder}: {len(ids)} ids but {len(doc_terms)} word counts")
        return cls(ids, model, config, doc_terms)

    @classmethod
    def cached(
        cls,
        corpus: Corpus,
        config: BM25Config | None = None,
        cache_dir: str | Path | None = None,
    ) -> BM25Index:
        """The index of ``corpus`` from ``CACHE/bm25/``, built and stored there if missing."""
        from routerretriever.store import corpus_fingerprint

        config = config or BM25Config()
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        folder = root / "bm25" / f"{corpus_fingerprint(corpus)}-{config.fingerprint}"
        if folder.is_dir():
            try:
                index = cls.load(folder)
                if index.ids == list(corpus):
                    logger.info("re-using the BM25 index in %s", folder)
                    index.config = config  # the same index; the feedback settings may differ
                    return index
                logger.warning("%s does not match the corpus; rebuilding", folder)
            except (OSError, ValueError, KeyError) as e:
                logger.warning("cannot read the BM25 index %s (%s); rebuilding", folder, e)
        index = cls.build(corpus, config)
        index.save(folder)
        logger.info("cached the BM25 index in %s", folder)
        index = cls.load(folder)
        index.config = config
        return index

    def scores(self, query: str, exclude_id: str | None = None) -> np.ndarray:
        """BM25 score of every document for one query, ``(N,)`` float32, in ``ids`` order,
        expanded by feedback if the config asks (never from ``exclude_id``'s words)."""
        words = tokenize([query], self.config)[0]
        tokens = self._model.get_tokens_ids(words)
        if not tokens:
            return np.zeros(len(self.ids), dtype=np.float32)
        s = self._term_scores(tokens)
        if self.config.feedback:
            first = s
            skip = self._id_pos.get(exclude_id) if exclude_id is not None else None
            if skip is not None:
                first = s.copy()
                first[skip] = 0.0
            s = self._expand(s, first, len(tokens))
        return s

    def _term_scores(self, tokens: list[int]) -> np.ndarray:
        s = np.asarray(self._model.get_scores_from_ids(tokens), dtype=np.float32)
        return np.nan_to_num(s, nan=0.0)  # a corpus without a single word has no mean length

    @functools.cached_property
    def _word_of_id(self) -> dict[int, str]:
        return {i: w for w, i in self._model.vocab_dict.items()}

    def _expansion(self, scores: np.ndarray) -> dict[int, float]:
        """The feedback words (token id to ``p(w|F)``, renormalised over those kept) drawn
        from the best documents of ``scores`` (positive ones only; ties by corpus order)."""
        cfg = self.config
        k = min(cfg.feedback_docs, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.lexsort((top, -scores[top]))]
        top = top[scores[top] > 0]
        p: dict[int, float] = {}
        for j in top.tolist():
            terms, counts = self._doc_terms.row(j)
            total = counts.sum()
            for t, c in zip(terms.tolist(), counts.tolist(), strict=True):
                p[t] = p.get(t, 0.0) + c / total / len(top)
        # Ties by the word itself: bm25s numbers its words differently in every process.
        word = self._word_of_id
        kept = sorted(p.items(), key=lambda x: (-x[1], word[x[0]]))[: cfg.feedback_terms]
        z = sum(x for _, x in kept)
        return {t: x / z for t, x in kept} if z > 0 else {}

    def _expand(self, scores: np.ndarray, first: np.ndarray, n_tokens: int) -> np.ndarray:
        """``(1 - w) * scores / n_tokens + w * sum_t p(t|F) * bm25(t)``, the feedback drawn
        from ``first``: the query's words share ``1 - w`` of the weight by their counts."""
        extra = self._expansion(first)
        if not extra:
            return scores
        w = self.config.feedback_weight
        out = (1 - w) / n_tokens * scores
        for t, x in extra.items():
            out += (w * x) * self._term_scores([t])
        return out.astype(np.float32, copy=False)

    def search(
        self, queries: Sequence[str], k: int, exclude_ids: Sequence[str | None] | None = None
    ) -> list[Hits]:
        """Top-``k`` ``(doc_id, score)`` per query with a positive score, best first (ties by
        corpus order); ``exclude_ids[i]`` is never a hit of query ``i`` (BEIR's convention)."""
        return self.search_with_stats(queries, k, exclude_ids)[0]

    def search_with_stats(
        self, queries: Sequence[str], k: int, exclude_ids: Sequence[str | None] | None = None
    ) -> tuple[list[Hits], np.ndarray]:
        """:meth:`search`, and the mean and standard deviation of each query's scores over
        every document ``(n, 2)`` (of the scores it computes anyway: no extra cost)."""
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        if exclude_ids is not None and len(exclude_ids) != len(queries):
            raise ValueError("exclude_ids must have one entry per query")
        out: list[Hits] = []
        stats = np.zeros((len(queries), 2))
        for i, query in enumerate(queries):
            skip = exclude_ids[i] if exclude_ids is not None else None
            s = self.scores(query, skip)  # (N,)
            stats[i] = s.mean(dtype=np.float64), s.std(dtype=np.float64)
            if skip is not None and skip in self._id_pos:
                s[self._id_pos[skip]] = 0.0
            kk = min(k, len(s))
            top = np.argpartition(-s, kk - 1)[:kk]
            top = top[np.lexsort((top, -s[top]))]  # by score, then corpus order
            out.append([(self.ids[j], float(s[j])) for j in top if s[j] > 0])
        return out, stats
