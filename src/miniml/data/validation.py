"""Validation rules per column (min, max, allow_nulls, allowed_values, unique, dtype), in one streaming pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from miniml.data.formats import TableFile
from miniml.errors import InvalidInput

EXAMPLES = 5


@dataclass
class _Finding:
    count: int = 0
    examples: list[int] = field(default_factory=list)

    def add(self, mask: np.ndarray, offset: int) -> None:
        hits = np.flatnonzero(mask)
        self.count += len(hits)
        room = EXAMPLES - len(self.examples)
        if room > 0:
            self.examples.extend(int(i) + offset + 1 for i in hits[:room])


def validate_table(
    table: TableFile, kinds: dict[str, str], rules: dict[str, dict[str, Any]]
) -> tuple[int, list[dict[str, Any]]]:
    """Return (rows, issues). ``kinds`` is the stored schema (column → kind); rows count from 1."""
    unknown = sorted(set(rules) - set(kinds))
    if unknown:
        raise InvalidInput(
            f"Rules name unknown column(s) {', '.join(map(repr, unknown))}; the columns are {', '.join(kinds)}."
        )
    findings: dict[tuple[str, str], _Finding] = {}
    seen: dict[str, set[Any]] = {c: set() for c, r in rules.items() if r.get("unique")}
    value_sets: dict[str, pa.Array] = {}
    issues: list[dict[str, Any]] = []
    for column, rule in rules.items():
        for bound in ("min", "max"):
            if rule.get(bound) is not None and kinds[column] != "numeric":
                raise InvalidInput(f"Rule {bound!r} needs a numeric column; {column!r} is {kinds[column]}.")
        expected = rule.get("dtype")
        if expected is not None and expected != kinds[column]:
            issues.append(
                {
                    "column": column,
                    "rule": "dtype",
                    "count": 1,
                    "example_rows": [],
                    "detail": f"expected {expected}, found {kinds[column]}",
                }
            )
    rows = 0
    for batch in table.batches():
        for column, rule in rules.items():
            arr = batch.column(column)
            masks: dict[str, Any] = {}
            if rule.get("min") is not None:
                masks["min"] = pc.less(arr, rule["min"])
            if rule.get("max") is not None:
                masks["max"] = pc.greater(arr, rule["max"])
            if rule.get("allow_nulls") is False:
                masks["allow_nulls"] = pc.is_null(arr)
            if rule.get("allowed_values") is not None:
                if column not in value_sets:
                    value_sets[column] = _value_set(column, arr.type, rule["allowed_values"])
                masks["allowed_values"] = pc.invert(pc.is_in(arr, value_set=value_sets[column]))
            for name, mask in masks.items():
                hits = np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)
                findings.setdefault((column, name), _Finding()).add(hits, rows)
            if column in seen:
                dup = np.zeros(len(arr), dtype=bool)
                for i, value in enumerate(arr.to_pylist()):
                    if value is None:
                        continue
                    if value in seen[column]:
                        dup[i] = True
                    else:
                        seen[column].add(value)
                findings.setdefault((column, "unique"), _Finding()).add(dup, rows)
        rows += batch.num_rows
    for (column, rule_name), finding in findings.items():
        if finding.count:
            issues.append(
                {"column": column, "rule": rule_name, "count": finding.count, "example_rows": finding.examples}
            )
    return rows, issues


def _value_set(column: str, dtype: pa.DataType, allowed: list[Any]) -> pa.Array:
    try:
        return pa.array(allowed).cast(dtype)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        raise InvalidInput(
            f"allowed_values for {column!r} do not fit its type ({dtype}); give values of that type."
        ) from None
