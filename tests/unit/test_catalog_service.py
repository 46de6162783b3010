"""UpsertItems / DeleteItems validation: every bad field is INVALID_ARGUMENT naming the field, value and limit."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import date
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from ranker.domain import CatalogItem
from ranker.errors import InvalidArgument
from ranker.service import MAX_DELETE_ITEMS, MAX_UPSERT_ITEMS, to_catalog_items, to_item_ids
from ranker.v1 import ranker_pb2

GOOD = {"item_id": "sku-1", "title": "Step ladder"}


def upsert(*items: Mapping[str, Any]) -> tuple[CatalogItem, ...]:
    return to_catalog_items(ranker_pb2.UpsertItemsRequest(items=[ranker_pb2.CatalogItem(**i) for i in items]))


def test_an_item_converts_with_unknowns_left_unknown() -> None:
    created = Timestamp()
    created.FromJsonString("2026-03-04T23:30:00Z")
    (full,) = upsert(
        {
            **GOOD,
            "title": "  Step ladder ",
            "category": "ladders",
            "brand": " ",
            "price": 0.0,
            "margin": -2.5,
            "in_stock": False,
            "created_at": created,
        }
    )
    assert full.title == "Step ladder" and full.category == "ladders" and full.brand is None
    assert full.price == 0.0 and full.margin == -2.5 and full.in_stock is False
    assert full.created_at == date(2026, 3, 4) and full.popularity is None and full.rating is None
    (bare,) = upsert(GOOD)
    assert bare.price is None and bare.in_stock is None and bare.created_at is None and bare.category is None


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([], f"items: must hold 1..{MAX_UPSERT_ITEMS} items, got 0"),
        ([GOOD] * (MAX_UPSERT_ITEMS + 1), f"items: must hold 1..{MAX_UPSERT_ITEMS} items, got {MAX_UPSERT_ITEMS + 1}"),
        ([GOOD, {**GOOD, "item_id": ""}], "items[1].item_id: must not be empty"),
        ([{**GOOD, "item_id": " sku"}], "items[0].item_id: must not start or end with whitespace, got ' sku'"),
        ([{**GOOD, "item_id": "x" * 300}], "items[0].item_id: must be at most 256 characters, got 300"),
        ([GOOD, {**GOOD, "title": "x"}], "items[1].item_id: repeats items[0]: 'sku-1'"),
        ([{**GOOD, "title": "   "}], "items[0].title: must not be empty"),
        ([{**GOOD, "title": "t" * 1001}], "items[0].title: must be at most 1000 characters, got 1001"),
        ([{**GOOD, "category": "c" * 257}], "items[0].category: must be at most 256 characters, got 257"),
        (
            [GOOD, GOOD | {"item_id": "b"}, GOOD | {"item_id": "c"}, GOOD | {"item_id": "d", "price": math.nan}],
            "items[3].price: must be a number in 0..1e+12, got nan",
        ),
        ([{**GOOD, "price": -1.0}], "items[0].price: must be a number in 0..1e+12, got -1.0"),
        ([{**GOOD, "price": math.inf}], "items[0].price: must be a number in 0..1e+12, got inf"),
        ([{**GOOD, "popularity": -3.0}], "items[0].popularity: must be a number in 0..1e+12, got -3.0"),
        ([{**GOOD, "rating": math.nan}], "items[0].rating: must be a number in 0..1e+12, got nan"),
        ([{**GOOD, "boost": -math.inf}], "items[0].boost: must be a number in -1e+12..1e+12, got -inf"),
        ([{**GOOD, "margin": math.nan}], "items[0].margin: must be a number in -1e+12..1e+12, got nan"),
        ([{**GOOD, "margin": 1e308}], "items[0].margin: must be a number in -1e+12..1e+12, got 1e+308"),
        ([{**GOOD, "created_at": Timestamp(seconds=2**62)}], "items[0].created_at: must be a valid timestamp"),
    ],
)
def test_bad_items_name_the_field(items: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        upsert(*items)
    assert message in str(caught.value)


def test_delete_ids_are_checked_and_deduplicated() -> None:
    assert to_item_ids(ranker_pb2.DeleteItemsRequest(item_ids=["a", "b", "a"])) == ("a", "b")
    cases = {
        (): f"item_ids: must hold 1..{MAX_DELETE_ITEMS} ids, got 0",
        ("a", ""): "item_ids[1]: must not be empty",
        ("a", "b", "x" * 257): "item_ids[2]: must be at most 256 characters, got 257",
        ("a ",): "item_ids[0]: must not start or end with whitespace",
    }
    for ids, message in cases.items():
        with pytest.raises(InvalidArgument) as caught:
            to_item_ids(ranker_pb2.DeleteItemsRequest(item_ids=list(ids)))
        assert message in str(caught.value)
    too_many = ranker_pb2.DeleteItemsRequest(item_ids=[f"i{n}" for n in range(MAX_DELETE_ITEMS + 1)])
    with pytest.raises(InvalidArgument, match=f"got {MAX_DELETE_ITEMS + 1}"):
        to_item_ids(too_many)
