"""Feature rows: shape, order of names, and values a user could check by hand."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ranker.features import FEATURE_NAMES, NO_NUMBER, NUM_FEATURES, TitleIndex, assemble
from ranker.mapped import mappings


def assemble_texts(
    query_text: str, query: list[str], texts: list[str], items: list[list[str]], dense: np.ndarray, bm25: np.ndarray
) -> np.ndarray:
    index = TitleIndex.build(texts, items)
    return assemble(query_text, query, index, np.arange(len(texts)), dense, bm25)


def features(query: list[str], items: list[list[str]], dense: np.ndarray, bm25: np.ndarray) -> np.ndarray:
    """assemble() where the raw texts are the terms joined by spaces."""
    return assemble_texts(" ".join(query), query, [" ".join(t) for t in items], items, dense, bm25)


def column(name: str, query_text: str, texts: list[str]) -> list[float]:
    """One match feature for raw texts, each text's terms being its whitespace-separated words."""
    items = [t.split() for t in texts]
    n = len(texts)
    return assemble_texts(query_text, query_text.split(), texts, items, np.zeros(n), np.zeros(n))[:, col(name)].tolist()


def trigram_coverage(query_text: str, texts: list[str]) -> list[float]:
    return column("query_trigram_coverage", query_text, texts)


def number_match(query_text: str, texts: list[str]) -> list[float]:
    return column("query_number_match", query_text, texts)


def col(name: str) -> int:
    return FEATURE_NAMES.index(name)


def test_shape_and_dtype() -> None:
    x = features(["drill"], [["drill", "bit"], ["paint"]], np.array([0.9, 0.1]), np.array([2.0, 0.0]))
    assert x.shape == (2, NUM_FEATURES) and x.dtype == np.float32


def test_overlap_features() -> None:
    x = features(["cordless", "drill"], [["cordless", "drill", "kit"], ["drill"]], np.zeros(2), np.zeros(2))
    assert x[:, col("query_term_coverage")].tolist() == [1.0, 0.5]
    assert x[:, col("title_term_precision")] == pytest.approx([2 / 3, 1.0])
    assert x[:, col("query_bigram_coverage")].tolist() == [1.0, 0.0]


def test_relative_features() -> None:
    x = features(["a"], [["a"], ["b"], ["c"]], np.array([0.2, 0.8, 0.5]), np.array([4.0, 2.0, 0.0]))
    assert x[:, col("dense_gap_to_best")] == pytest.approx([-0.6, 0.0, -0.3])
    assert x[:, col("dense_rank_reciprocal")] == pytest.approx([1 / 3, 1.0, 0.5])
    assert x[:, col("bm25_ratio_to_best")] == pytest.approx([1.0, 0.5, 0.0])


def test_no_lexical_match_gives_zero_lexical_features() -> None:
    x = features(["zzz"], [["a"], ["b"]], np.array([0.3, 0.1]), np.zeros(2))
    assert not x[:, col("bm25_ratio_to_best")].any()
    assert not x[:, col("bm25_rank_reciprocal")].any()


def test_empty_candidates() -> None:
    assert features(["a"], [], np.zeros(0), np.zeros(0)).shape == (0, NUM_FEATURES)


def test_trigram_coverage_survives_typos_and_joined_words() -> None:
    cover = trigram_coverage("dewalt driil", ["DEWALT 20V Drill", "Behr paint", ""])
    assert cover[0] > 0.6 > cover[1] and cover[2] == 0.0
    # "2x4" against "2 x 4": shares " 2 " padding trigrams only partly, "2x4" itself fully.
    assert trigram_coverage("2x4", ["2x4 stud"])[0] == 1.0
    assert trigram_coverage("", ["anything"]) == [0.0]


def test_trigrams_never_straddle_two_titles() -> None:
    # Padded and joined, "ab" and "cd" read " ab  cd ": its windows "b  " and "  c" straddle both titles
    # and are in the query " b  c ", so they must count for neither.
    assert trigram_coverage("b  c", ["ab", "cd"]) == [0.0, 0.0]
    assert trigram_coverage("ab", ["xx", "ab"]) == [0.0, 1.0]


def test_number_match() -> None:
    assert number_match("2 in. x 4 in. x 8 ft.", ["2 in. x 4 in. x 8 ft. Stud", "2 in. x 6 in. x 12 ft."]) == [
        1.0,
        pytest.approx(1 / 3),
    ]
    assert number_match("cordless drill", ["18V drill"]) == [NO_NUMBER]
    # Whole numbers only: "12" is not matched inside "120".
    assert number_match("12 volt", ["120 volt"]) == [0.0]


def test_last_query_term_is_the_product_type() -> None:
    x = features(["cordless", "drill"], [["drill", "bit"], ["cordless", "saw"]], np.zeros(2), np.zeros(2))
    assert x[:, col("last_query_term_in_title")].tolist() == [1.0, 0.0]


def reference(query_text: str, query: list[str], texts: list[str], items: list[list[str]]) -> np.ndarray:
    """Columns 6-13 computed the plain way, one set intersection per candidate."""

    def trigrams(text: str) -> set[bytes]:
        b = f" {text.lower()} ".encode()
        return {b[i : i + 3] for i in range(len(b) - 2)}

    terms, pairs, grams = set(query), set(itertools.pairwise(query)), trigrams(query_text)
    numbers = set(re.findall(r"\d+", query_text))
    out = np.zeros((len(texts), 8))
    for i, (text, tokens) in enumerate(zip(texts, items, strict=True)):
        shared = len(terms & set(tokens))
        out[i] = [
            shared / len(terms) if terms else 0.0,
            shared / len(set(tokens)) if tokens else 0.0,
            len(pairs & set(itertools.pairwise(tokens))) / len(pairs) if pairs else 0.0,
            np.log1p(len(tokens)),
            np.log1p(len(query)),
            len(grams & trigrams(text)) / len(grams) if grams else 0.0,
            len(numbers & set(re.findall(r"\d+", text))) / len(numbers) if numbers else NO_NUMBER,
            bool(query) and query[-1] in tokens,
        ]
    return out


WORDS = st.sampled_from(["drill", "bit", "2x4", "12", "120", "v", "saw", "ñ", "x", "1/2", "in.", "٣", "v2٣"])


@settings(max_examples=200, deadline=None)
@given(
    query=st.lists(WORDS, max_size=5),
    titles=st.lists(st.lists(WORDS, max_size=8), max_size=8),
    appended=st.lists(st.lists(WORDS | st.sampled_from(["new", "term", "77"]), max_size=6), max_size=4),
    data=st.data(),
)
def test_title_index_matches_the_plain_computation(
    query: list[str], titles: list[list[str]], appended: list[list[str]], data: st.DataObject
) -> None:
    """Built, then appended to (online catalog updates), the index gives every candidate subset the
    values of one set intersection per title."""
    items = titles + appended
    texts = [" ".join(t).upper() for t in items]  # trigrams are case-blind
    index = TitleIndex.build(texts[: len(titles)], titles).appended(texts[len(titles) :], appended)
    rows = data.draw(st.lists(st.integers(0, max(len(items) - 1, 0)), max_size=len(items), unique=True))
    rows = rows if items else []
    query_text = " ".join(query)
    got = assemble(query_text, query, index, np.array(rows, dtype=np.int64), np.zeros(len(rows)), np.zeros(len(rows)))
    expected = reference(query_text, query, [texts[r] for r in rows], [items[r] for r in rows])
    np.testing.assert_allclose(got[:, 6:], expected, rtol=1e-6, atol=1e-6)


def test_appending_leaves_the_earlier_index_as_it_was() -> None:
    first = TitleIndex.build(["cordless drill"], [["cordless", "drill"]])
    second = first.appended(["gizmo drill"], [["gizmo", "drill"]])
    assert len(first) == 1 and len(second) == 2
    # "gizmo" is in the shared vocabulary now, yet the first index's rows do not have it.
    found, totals = first.matches(np.array([0]), "gizmo", ["gizmo"])
    assert found[0, 0] == 0 and totals[0] == 1
    found, _ = second.matches(np.array([0, 1]), "gizmo", ["gizmo"])
    assert found[:, 0].tolist() == [0, 1]


@pytest.mark.parametrize("mapped", [True, False])
def test_a_saved_index_loads_equal(tmp_path: Path, mapped: bool) -> None:
    titles = ["DEWALT 20V Drill", "Behr 1 gal. Paint", ""]
    tokens = [["dewalt", "20v", "drill"], ["behr", "1", "gal", "paint"], []]
    built = TitleIndex.build(titles, tokens)
    built.save(tmp_path / "text")
    loaded = TitleIndex.load(tmp_path / "text", mapped=mapped)
    assert loaded is not None and loaded.vocabulary == built.vocabulary
    assert bool(mappings(tmp_path / "text" / "codes.npy")) is mapped
    assert type(loaded.codes) is np.ndarray and not (mapped and loaded.codes.flags.writeable)
    rows = np.array([2, 0, 1])
    for query, terms in (("dewalt drill 20v", ["dewalt", "drill", "20v"]), ("1 gal paint", ["1", "gal", "paint"])):
        a, b = built.matches(rows, query, terms), loaded.matches(rows, query, terms)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    # Appending to a loaded index extends its vocabulary like a built one.
    grown = loaded.appended(["Gizmo Drill"], [["gizmo", "drill"]])
    assert grown.matches(np.array([3]), "gizmo", ["gizmo"])[0][0, 0] == 1
    assert TitleIndex.load(tmp_path / "missing") is None
