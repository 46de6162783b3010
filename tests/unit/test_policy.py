"""The policy file: defaults, overrides, rules, and errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ranker.blending import DEFAULT_POLICY, Normalization, apply_overrides
from ranker.domain import DiversityMethod, RuleAction
from ranker.errors import MAX_MESSAGE_CHARS, InvalidArgument
from ranker.policy import load_policy, make_rule

GOOD = """
max_weight = 5.0
[signals.popularity]
weight = 0.2
normalization = "rank"
[signals.price]
weight = 0.1
higher_is_better = false
[diversity]
method = "dpp"
strength = 0.25
max_per_brand = 2
[[rules]]
action = "pin"
item_ids = ["sku-1"]
position = 1
[[rules]]
action = "bury"
field = "brand"
values = ["Acme"]
amount = 0.5
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_a_policy_file_overrides_only_what_it_names(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, GOOD))
    assert policy.max_weight == 5.0
    assert policy.signals["popularity"].weight == 0.2
    assert policy.signals["popularity"].normalization is Normalization.RANK
    assert policy.signals["price"].higher_is_better is False
    assert policy.signals["ranker"] == DEFAULT_POLICY["ranker"]
    assert policy.diversity.method is DiversityMethod.DPP and policy.diversity.max_per_brand == 2
    assert [r.action for r in policy.rules] == [RuleAction.PIN, RuleAction.BURY]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 1", "unknown key(s) ['colour']"),
        ("[signals.likes]\nweight = 1", "signals.likes: unknown signal"),
        ("[signals.ranker]\nweight = 50", "signals.ranker.weight: must be in 0..10, got 50"),
        ('[signals.ranker]\nnormalization = "log"', "signals.ranker.normalization: must be one of"),
        ('[diversity]\nmethod = "random"', "diversity.method: must be one of"),
        ("[diversity]\nwindow = 500", "diversity.window: must be in 0..200, got 500"),
        (
            '[[rules]]\naction = "pin"\nitem_ids = ["a", "b"]\nposition = 1',
            "rules[0].item_ids: a pin names exactly one",
        ),
        ('[[rules]]\naction = "boost"\nitem_ids = ["a"]\namount = 0', "rules[0].amount: must be in (0, 100]"),
        ('[[rules]]\naction = "exclude"', "rules[0]: give either item_ids or field with values"),
        ('[[rules]]\naction = "exclude"\nitem_ids = "d1"', "rules[0].item_ids: must be an array of strings, got 'd1'"),
        (
            '[[rules]]\naction = "bury"\nfield = "brand"\nvalues = "Acme"\namount = 1',
            "rules[0].values: must be an array of strings, got 'Acme'",
        ),
        ('[[rules]]\naction = "pin"\nitem_ids = ["a"]\nposition = "first"', "rules[0].position: must be an integer"),
        ('[[rules]]\naction = "boost"\nitem_ids = ["a"]\namount = "lots"', "rules[0].amount: must be a finite number"),
        ("max_weight = [", "not valid TOML"),
        (
            '[[rules]]\naction = "pin"\nitem_ids = ["a"]\nfield = "brand"\nposition = 1',
            "rules[0].field: a pin names one item id, not a field",
        ),
        ('[[rules]]\naction = "exclude"\nvalues = ["Acme"]', "rules[0].values: values need a field"),
        (
            '[[rules]]\naction = "bury"\nitem_ids = ["a"]\namount = 1\nposition = 3',
            "rules[0].position: only a pin has a position, got 3 on a bury",
        ),
        (
            '[[rules]]\naction = "exclude"\nitem_ids = ["a"]\namount = 2',
            "rules[0].amount: only boost and bury have an amount, got 2.0 on a exclude",
        ),
    ],
)
def test_errors_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidArgument) as caught:
        load_policy(path)
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_the_default_diversity_can_be_max_sum_by_windows(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, '[diversity]\nmethod = "max_sum"\nstrength = 0.04\nwindow = 10'))
    assert policy.diversity.method is DiversityMethod.MAX_SUM
    assert (policy.diversity.strength, policy.diversity.window) == (0.04, 10)


def test_a_method_named_without_a_strength_gets_its_default(tmp_path: Path) -> None:
    for method, strength in (("max_sum", 0.04), ("mmr", 0.3), ("dpp", 0.3), ("none", 0.0)):
        policy = load_policy(write(tmp_path, f'[diversity]\nmethod = "{method}"'))
        assert policy.diversity.strength == strength


def test_messages_stay_short_whatever_the_input() -> None:
    """The status travels in a trailer that gRPC caps at 16 KiB: a 20,000-character value must not reach it."""
    with pytest.raises(InvalidArgument) as caught:
        apply_overrides(DEFAULT_POLICY, {"x" * 20_000: 1.0}, max_weight=10)
    assert len(str(caught.value)) <= MAX_MESSAGE_CHARS and "blend.weights['xxx" in str(caught.value)
    with pytest.raises(InvalidArgument) as caught:
        make_rule("rules[0]", action=RuleAction.EXCLUDE, item_ids=frozenset(), field="f" * 20_000,
                  values=frozenset({"v"}), amount=0.0, position=0, max_amount=10)  # fmt: skip
    assert len(str(caught.value)) < 300
    assert len(str(InvalidArgument("field", "y" * 50_000))) <= MAX_MESSAGE_CHARS
