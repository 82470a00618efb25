"""Settings hashes: each sweep step is keyed by a hash of exactly the recipe values that produced
it, chained through the steps it depends on. Re-running a sweep after editing the recipe redoes
the affected steps (and everything downstream of them) and reuses the rest."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def settings_hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StepKeys:
    """``dense``, ``control``, ``sparse(name)``, ``prune(name)``, ``retrain(name)`` keys for a recipe."""

    def __init__(self, recipe: Any) -> None:
        r = recipe.to_dict()
        self.dense = settings_hash({"model": r["model"], "data": r["data"], "train": r["train"]})
        self.control = settings_hash({"after": self.dense, "retrain": r["retrain"]})
        prune = {k: v for k, v in r["prune"].items()}
        self._prune = settings_hash({"after": self.dense, "prune": prune})
        self._retrain = r["retrain"]

    def prune(self, name: str) -> str:
        # the variant name carries its ratio / sparsity; the prune section the rest
        return settings_hash({"after": self._prune, "variant": name})

    def sparse(self, name: str) -> str:
        """Sparse training of a '+sparse' variant: the dense model, the prune section (sparsify,
        criterion), the retraining settings it trains with, the variant (its ratio)."""
        return settings_hash({"after": self._prune, "retrain": self._retrain, "variant": name, "step": "sparse"})

    def retrain(self, name: str) -> str:
        return settings_hash({"after": self.prune(name), "retrain": self._retrain})
