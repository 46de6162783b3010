"""offline.data: catalog/judgment loaders, column aliases, and the query-level train/dev split."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from offline import data
from ranker.release import ITEM_SCHEMA


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_catalog_with_all_columns(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.csv",
        "item_id,title,category,brand,price\n007,Claw Hammer,Hand Tools,Estwing,24.97\n8, Tape Measure ,,,\n",
    )
    items = data.load_catalog(path)
    assert dict(items.schema) == ITEM_SCHEMA
    assert items["item_id"].to_list() == ["007", "8"]  # ids stay text: leading zeros survive
    assert items["title"].to_list() == ["Claw Hammer", "Tape Measure"]
    assert items["category"].to_list() == ["Hand Tools", None]
    assert items["price"].to_list() == [24.97, None]


def test_catalog_home_depot_aliases_and_missing_optionals(tmp_path: Path) -> None:
    path = write(tmp_path / "p.csv", "product_uid,product_title\n100001,Simpson Strong-Tie 12-Gauge Angle\n")
    items = data.load_catalog(path)
    assert items.columns == list(ITEM_SCHEMA)
    assert items.row(0)[:5] == ("100001", "Simpson Strong-Tie 12-Gauge Angle", None, None, None)


def test_catalog_parquet(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    pl.DataFrame({"item_id": [1, 2], "title": ["a b", "c d"], "price": [1.5, None]}).write_parquet(path)
    items = data.load_catalog(path)
    assert items["item_id"].to_list() == ["1", "2"]
    assert items["price"].to_list() == [1.5, None]


def test_catalog_drops_duplicate_ids_keeping_the_first(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "item_id,title\n1,first\n2,second\n1,again\n")
    assert data.load_catalog(path).select("item_id", "title", "category", "brand", "price").rows() == [
        ("1", "first", None, None, None),
        ("2", "second", None, None, None),
    ]


def test_catalog_limit_keeps_first_rows(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "item_id,title\n1,a\n2,b\n3,c\n")
    assert data.load_catalog(path, limit=2)["item_id"].to_list() == ["1", "2"]


def test_catalog_empty_titles_are_an_error_with_the_count(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", 'item_id,title\n1,ok\n2,\n3,"  "\n')
    with pytest.raises(data.DataError, match="2 row"):
        data.load_catalog(path)


def test_catalog_missing_column_names_the_aliases(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "id,name\n1,a\n")
    with pytest.raises(data.DataError, match="product_title"):
        data.load_catalog(path)


def test_catalog_bad_price(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "item_id,title,price\n1,a,cheap\n")
    with pytest.raises(data.DataError, match="price"):
        data.load_catalog(path)


def test_judgments_home_depot_columns_and_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "j.csv"
    path.write_bytes(b"id,product_uid,search_term,relevance\n2,100001,angle bracket,3\n3,100001,l br\xe9cket,2.33\n")
    judgments = data.load_judgments(path)
    assert judgments.columns == ["query", "item_id", "relevance"]
    assert judgments["item_id"].to_list() == ["100001", "100001"]
    assert judgments["relevance"].to_list() == [3.0, 2.33]
    assert judgments["query"][1].startswith("l br")  # the bad byte is replaced, not fatal


def test_judgments_own_columns_and_duplicate_pairs_averaged(tmp_path: Path) -> None:
    path = write(tmp_path / "j.csv", "query,item_id,relevance\ndrill,a,3\ndrill,a,2\ndrill,b,1\n")
    assert data.load_judgments(path).rows() == [("drill", "a", 2.5), ("drill", "b", 1.0)]


def test_judgments_non_numeric_relevance(tmp_path: Path) -> None:
    path = write(tmp_path / "j.csv", "query,item_id,relevance\ndrill,a,high\n")
    with pytest.raises(data.DataError, match="relevance"):
        data.load_judgments(path)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "3.5", "-4"])
def test_judgments_outside_the_graded_scale_are_refused(tmp_path: Path, value: str) -> None:
    path = write(tmp_path / "j.csv", f"query,item_id,relevance\ndrill,a,3\ndrill,b,{value}\n")
    with pytest.raises(data.DataError, match=r"1 row\(s\) have a relevance outside 1..3"):
        data.load_judgments(path)


def judgments_frame(n_queries: int = 400) -> pl.DataFrame:
    queries = [f"query {i}" for i in range(n_queries) for _ in range(3)]
    return pl.DataFrame(
        {"query": queries, "item_id": [str(i) for i in range(len(queries))], "relevance": [2.0] * len(queries)}
    )


def test_split_is_by_query_disjoint_and_complete() -> None:
    judgments = judgments_frame()
    split = data.split_queries(judgments, seed=13)
    train, dev = set(split.train["query"]), set(split.dev["query"])
    assert not train & dev
    assert train | dev == set(judgments["query"])
    assert split.train.height + split.dev.height == judgments.height
    assert 0.12 < len(dev) / 400 < 0.28  # about DEV_FRACTION


def test_split_is_deterministic_and_seeded() -> None:
    judgments = judgments_frame()
    first = data.split_queries(judgments, seed=13)
    again = data.split_queries(judgments.reverse(), seed=13)
    assert set(first.dev["query"]) == set(again.dev["query"])
    assert set(first.dev["query"]) != set(data.split_queries(judgments, seed=14).dev["query"])


def test_split_ignores_case_and_spacing() -> None:
    assert all(data.is_dev_query(q, 13) == data.is_dev_query(f"  {q.upper()}  ", 13) for q in ["deck  over", "a b"])
    assert data.normalise_query("  Deck \t Over ") == "deck over"


def test_judgments_by_query() -> None:
    frame = pl.DataFrame({"query": ["a", "b", "a"], "item_id": ["1", "2", "3"], "relevance": [3.0, 1.0, 2.0]})
    assert data.judgments_by_query(frame) == {"a": {"1": 3.0, "3": 2.0}, "b": {"2": 1.0}}


def test_catalog_business_columns_are_typed(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text(
        "item_id,title,popularity,rating,in_stock,created_at,margin\n"
        "1,first,12,4.5,yes,2025-03-01,0.2\n"
        "2,second,,,0,2025-03-02T10:00:00,\n"
    )
    items = data.load_catalog(path)
    assert items["popularity"].to_list() == [12.0, None]
    assert items["in_stock"].to_list() == [True, False]
    assert [d.isoformat() for d in items["created_at"].to_list()] == ["2025-03-01", "2025-03-02"]


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [("in_stock", "maybe", "in_stock that is not true/false"), ("created_at", "yesterday", "not a YYYY-MM-DD")],
)
def test_catalog_rejects_bad_business_values(tmp_path: Path, column: str, value: str, message: str) -> None:
    path = tmp_path / "c.csv"
    path.write_text(f"item_id,title,{column}\n1,first,{value}\n")
    with pytest.raises(data.DataError, match=message):
        data.load_catalog(path)
