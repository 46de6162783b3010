"""The ranking policy: blend signals and weights, default diversity and standing business rules.

A policy is a TOML file. The release carries one (`policy.toml`, written by offline.export); the
service's RANKER_POLICY_FILE replaces it; per-request overrides then adjust weights within
`max_weight`. A key left out keeps the built-in default (ranker.blending.DEFAULT_POLICY):

    max_weight = 10.0          # bound of a per-request blend weight
    max_rule_amount = 100.0    # bound of a boost/bury amount

    [signals.ranker]           # any of blending.COMPUTED_SIGNALS or blending.CATALOG_SIGNALS
    weight = 1.0
    normalization = "identity" # identity | minmax | zscore | rank
    [signals.popularity]
    weight = 0.2
    normalization = "rank"
    [signals.price]
    weight = 0.05
    higher_is_better = false
    missing = 0.0              # value for items without the attribute (default: the lowest present)

    [diversity]                # the default when a request leaves method unspecified
    method = "mmr"             # none | mmr | dpp | max_sum
    strength = 0.2
    max_per_category = 0
    max_per_brand = 3
    window = 0                 # > 0: diversify each run of this many positions, shown in relevance order

    [[rules]]                  # standing rules, applied to every request before the request's own
    action = "bury"            # pin | exclude | boost | bury
    field = "brand"            # match by attribute (category | brand) ...
    values = ["Acme"]
    amount = 0.5
    [[rules]]
    action = "pin"
    item_ids = ["sku-00042"]   # ... or by item id; a pin names exactly one item
    position = 1
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ranker.blending import CATALOG_SIGNALS, COMPUTED_SIGNALS, DEFAULT_POLICY, Normalization, SignalPolicy
from ranker.domain import DEFAULT_STRENGTH, RULE_FIELDS, DiversityMethod, DiversitySpec, Rule, RuleAction
from ranker.errors import InvalidArgument

POLICY_FILE = "policy.toml"
# A policy file's pins: up to the largest RANKER_MAX_TOP_K (a pin below top_k is simply not shown). A
# request's pins are held to the server's own max_top_k.
MAX_PIN_POSITION = 1000
KNOWN_SIGNALS = COMPUTED_SIGNALS + CATALOG_SIGNALS


@dataclass(frozen=True, kw_only=True)
class Policy:
    signals: Mapping[str, SignalPolicy] = field(default_factory=lambda: DEFAULT_POLICY)
    max_weight: float = 10.0
    max_rule_amount: float = 100.0
    diversity: DiversitySpec = field(default_factory=DiversitySpec)
    rules: tuple[Rule, ...] = ()


DEFAULT = Policy()


def _number(source: str, key: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(f"{source}: {key}", f"must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise InvalidArgument(f"{source}: {key}", f"must be in {low:g}..{high:g}, got {value!r}")
    return float(value)


def _check_keys(source: str, where: str, data: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InvalidArgument(f"{source}: {where}", f"unknown key(s) {unknown}; known: {sorted(allowed)}")


def _signal(source: str, name: str, data: Mapping[str, Any], max_weight: float) -> SignalPolicy:
    key = f"signals.{name}"
    if name not in KNOWN_SIGNALS:
        raise InvalidArgument(f"{source}: {key}", f"unknown signal; known: {list(KNOWN_SIGNALS)}")
    _check_keys(source, key, data, {"weight", "normalization", "higher_is_better", "missing"})
    base = DEFAULT_POLICY[name]
    spec = base
    if "weight" in data:
        spec = replace(spec, weight=_number(source, f"{key}.weight", data["weight"], 0.0, max_weight))
    if "normalization" in data:
        try:
            spec = replace(spec, normalization=Normalization(data["normalization"]))
        except ValueError:
            known = [n.value for n in Normalization]
            raise InvalidArgument(
                f"{source}: {key}.normalization", f"must be one of {known}, got {data['normalization']!r}"
            ) from None
    if "higher_is_better" in data:
        if not isinstance(data["higher_is_better"], bool):
            raise InvalidArgument(f"{source}: {key}.higher_is_better", "must be true or false")
        spec = replace(spec, higher_is_better=data["higher_is_better"])
    if "missing" in data:
        spec = replace(spec, missing=_number(source, f"{key}.missing", data["missing"], -1e12, 1e12))
    return spec


def _diversity(source: str, data: Mapping[str, Any]) -> DiversitySpec:
    _check_keys(source, "diversity", data, {"method", "strength", "max_per_category", "max_per_brand", "window"})
    try:
        method = DiversityMethod(data.get("method", "none"))
    except ValueError:
        known = [m.value for m in DiversityMethod]
        raise InvalidArgument(f"{source}: diversity.method", f"must be one of {known}") from None
    return DiversitySpec(
        method=method,
        strength=_number(source, "diversity.strength", data.get("strength", DEFAULT_STRENGTH[method]), 0.0, 1.0),
        max_per_category=int(_number(source, "diversity.max_per_category", data.get("max_per_category", 0), 0, 200)),
        max_per_brand=int(_number(source, "diversity.max_per_brand", data.get("max_per_brand", 0), 0, 200)),
        window=int(_number(source, "diversity.window", data.get("window", 0), 0, 200)),
    )


def make_rule(
    where: str,
    *,
    action: RuleAction,
    item_ids: frozenset[str],
    field: str,
    values: frozenset[str],
    amount: float,
    position: int,
    max_amount: float,
    max_position: int = MAX_PIN_POSITION,
) -> Rule:
    """One validated rule; `where` prefixes error messages (a file key or a request field)."""
    if field and field not in RULE_FIELDS:
        raise InvalidArgument(f"{where}.field", f"must be one of {list(RULE_FIELDS)} or empty, got {field[:64]!r}")
    if values and not field:
        raise InvalidArgument(f"{where}.values", "values need a field to match them against")
    if action is RuleAction.PIN:
        if field:
            raise InvalidArgument(f"{where}.field", f"a pin names one item id, not a field, got {field!r}")
        if len(item_ids) != 1:
            raise InvalidArgument(f"{where}.item_ids", f"a pin names exactly one item id, got {len(item_ids)}")
        if not 1 <= position <= max_position:
            raise InvalidArgument(f"{where}.position", f"must be 1..{max_position}, got {position}")
    else:
        if position:
            raise InvalidArgument(f"{where}.position", f"only a pin has a position, got {position} on a {action.value}")
        if bool(item_ids) == bool(field):
            raise InvalidArgument(where, "give either item_ids or field with values")
        if field and not values:
            raise InvalidArgument(f"{where}.values", f"at least one {field} value is needed")
    if action in (RuleAction.BOOST, RuleAction.BURY):
        if not (math.isfinite(amount) and 0.0 < amount <= max_amount):
            raise InvalidArgument(f"{where}.amount", f"must be in (0, {max_amount:g}], got {amount!r}")
    elif amount:
        raise InvalidArgument(
            f"{where}.amount", f"only boost and bury have an amount, got {amount!r} on a {action.value}"
        )
    return Rule(action=action, item_ids=item_ids, field=field, values=values, amount=amount, position=position)


def _rule(source: str, i: int, data: Mapping[str, Any], max_amount: float) -> Rule:
    where = f"{source}: rules[{i}]"
    _check_keys(source, f"rules[{i}]", data, {"action", "item_ids", "field", "values", "amount", "position"})
    try:
        action = RuleAction(data.get("action"))
    except ValueError:
        known = [a.value for a in RuleAction]
        raise InvalidArgument(f"{where}.action", f"must be one of {known}, got {data.get('action')!r}") from None
    position = data.get("position", 0)
    if isinstance(position, bool) or not isinstance(position, int):
        raise InvalidArgument(f"{where}.position", f"must be an integer, got {position!r}")
    field = data.get("field", "")
    if not isinstance(field, str):
        raise InvalidArgument(f"{where}.field", f"must be a string, got {field!r}")
    return make_rule(
        where,
        action=action,
        item_ids=_strings(f"{where}.item_ids", data.get("item_ids", [])),
        field=field,
        values=_strings(f"{where}.values", data.get("values", [])),
        amount=_number(source, f"rules[{i}].amount", data.get("amount", 0.0), -math.inf, math.inf),
        position=position,
        max_amount=max_amount,
    )


def _strings(where: str, value: Any) -> frozenset[str]:
    """A TOML array of strings (a bare string would otherwise be read as its characters)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(where, f"must be an array of strings, got {value!r}")
    return frozenset(value)


def policy_from_mapping(data: Mapping[str, Any], source: str) -> Policy:
    """Validate a parsed policy; every error names the file and the key."""
    _check_keys(source, "top level", data, {"max_weight", "max_rule_amount", "signals", "diversity", "rules"})
    max_weight = _number(source, "max_weight", data.get("max_weight", DEFAULT.max_weight), 0.0, 1e6)
    max_amount = _number(source, "max_rule_amount", data.get("max_rule_amount", DEFAULT.max_rule_amount), 0.0, 1e6)
    signals = dict(DEFAULT_POLICY)
    for name, spec in data.get("signals", {}).items():
        signals[name] = _signal(source, name, spec, max_weight)
    return Policy(
        signals=signals,
        max_weight=max_weight,
        max_rule_amount=max_amount,
        diversity=_diversity(source, data.get("diversity", {})),
        rules=tuple(_rule(source, i, r, max_amount) for i, r in enumerate(data.get("rules", []))),
    )


def load_policy(path: Path) -> Policy:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(str(path), f"not valid TOML: {e}") from e
    return policy_from_mapping(data, str(path))
