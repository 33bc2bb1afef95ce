"""Corpus sketches and scopes: which corpus an expert's gate evidence came from."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routerretriever.corpora import SKETCH_SIZE, CorpusScope, CorpusSketch
from routerretriever.data import Document


def sketch(ids, text="same"):
    return CorpusSketch.of({i: Document(text) for i in ids})


ids = st.sets(st.text(min_size=1, max_size=12), max_size=300)


@given(ids, ids)
@settings(max_examples=200, deadline=None)
def test_small_corpora_get_their_exact_jaccard_whatever_the_order(a, b):
    sa, sb = sketch(sorted(a)), sketch(reversed(sorted(b)))
    assert sketch(sorted(a, reverse=True)) == sa  # whatever the order
    if len(a) <= SKETCH_SIZE and len(b) <= SKETCH_SIZE and (a or b):
        assert sa.similarity(sb) == pytest.approx(len(a & b) / len(a | b))
    assert sa.similarity(sb) == sb.similarity(sa)
    assert sa.similarity(sa) == 1.0
    assert CorpusSketch.from_json(json.loads(json.dumps(sa.to_json()))) == sa


def test_a_grown_corpus_is_the_same_corpus_and_another_one_is_not():
    base = [f"doc{i}" for i in range(5000)]
    grown = sketch([*base, *(f"new{i}" for i in range(500))])
    trimmed = sketch(base[:4000])
    other = sketch(f"other{i}" for i in range(5000))
    one = sketch(base)
    assert one.matches(grown) and one.matches(trimmed)
    assert not one.matches(other) and one.similarity(other) == 0.0
    assert abs(one.similarity(grown) - 5000 / 5500) < 0.08  # the estimate's spread
    # Numbered collections share ids, not documents: Cranfield's "1" is not CISI's "1".
    assert one.similarity(sketch(base, text="another collection")) == 0.0


def test_a_scope_excludes_only_the_experts_it_names_elsewhere():
    a, b = sketch(["1", "2", "3"]), sketch(["x", "y"])
    scope = CorpusScope({"a": a, "b": b}, {"e1": ("a",), "e2": ("a", "b")})
    assert scope.excluded(a) == []
    assert scope.excluded(b) == ["e1"]
    assert scope.excluded(sketch(["q"])) == ["e1", "e2"]  # "e3" is not limited
    assert CorpusScope.from_json(json.loads(json.dumps(scope.to_json()))) == scope
    with pytest.raises(ValueError, match="no sketch"):
        CorpusScope({"a": a}, {"e1": ("c",)})


junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)


@given(junk)
@settings(max_examples=300, deadline=None)
def test_any_scope_json_loads_or_says_which_field_is_wrong(spec):
    for load in (CorpusScope.from_json, CorpusSketch.from_json):
        try:
            load(spec)
        except ValueError as e:
            assert "scope" in str(e) or "sketch" in str(e)


@given(st.integers(), st.lists(st.text(max_size=18), max_size=5))
def test_a_bad_sketch_names_its_field(size, hashes):
    try:
        sketch = CorpusSketch.from_json({"size": size, "hashes": hashes})
    except ValueError as e:
        assert "'size'" in str(e) or "'hashes'" in str(e)
    else:
        assert sketch.size == size and len(sketch.hashes) == len(hashes)
