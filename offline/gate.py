"""The release gate: a new release may not publish a worse dev NDCG@10 than the release it replaces.

Both numbers come from the manifests' training diagnostics (`metrics.dev["dev_ndcg@10"]`), which
rank the dev split's queries through the service's own retrieval, features and scoring. They are
only compared when both releases were judged on the same judgments file and split seed; otherwise
the gate says why it cannot compare and lets the release through.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ranker.release import MANIFEST

METRIC = "dev_ndcg@10"


class GateRefused(RuntimeError):
    """The new release is worse on dev than the current one, and no override was given."""


@dataclass(frozen=True, kw_only=True)
class GateDecision:
    decision: str  # "first release" | "not comparable" | "passed" | "overridden"
    reason: str
    previous_release: str | None = None
    previous: float | None = None
    current: float | None = None

    def as_manifest(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "reason": self.reason,
            "metric": METRIC,
            "previous_release": self.previous_release,
            "previous": self.previous,
            "new": self.current,
        }


def _dev_ndcg(manifest: dict[str, Any]) -> float | None:
    value = manifest.get("metrics", {}).get("dev", {}).get(METRIC)
    return None if value is None else float(value)


def _judged_on(manifest: dict[str, Any]) -> tuple[Any, ...]:
    """What a dev NDCG depends on besides the models: the judgments, the split, and the corpus ranked over."""
    data = manifest.get("data") or {}
    split = data.get("split") or {}
    return (
        data.get("judgments_sha256"),
        split.get("seed"),
        data.get("catalog_sha256"),
        data.get("catalog_limit"),
    )


def check(new: dict[str, Any], current_dir: Path, *, allow_regression: bool) -> GateDecision:
    """Compare the new manifest with the release at `current_dir`; raises GateRefused on a regression."""
    path = current_dir / MANIFEST
    if not path.is_file():
        return GateDecision(decision="first release", reason=f"no release at {current_dir} yet")
    old = json.loads(path.read_text())
    previous, current = _dev_ndcg(old), _dev_ndcg(new)
    base = {"previous_release": old.get("release_id"), "previous": previous, "current": current}
    if previous is None or current is None:
        return GateDecision(decision="not comparable", reason=f"{METRIC} missing from a manifest", **base)
    if _judged_on(old) != _judged_on(new):
        return GateDecision(decision="not comparable", reason="judged on other judgments, split or catalog", **base)
    if current >= previous:
        return GateDecision(decision="passed", reason=f"{METRIC} {current:.4f} >= {previous:.4f}", **base)
    message = f"{METRIC} {current:.4f} is worse than the current release's {previous:.4f} ({old.get('release_id')})"
    if not allow_regression:
        raise GateRefused(f"refusing to publish: {message}; pass --allow-regression to publish anyway")
    return GateDecision(decision="overridden", reason=message, **base)
