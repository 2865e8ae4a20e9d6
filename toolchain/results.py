"""The sweep's results file (`results.json`): its schema, its upgrade from older files, and how
to read rows. Shared by the sweep that writes it and the report that reads it.

A file is `{"schema": SCHEMA, "config": {...}, "rows": [...]}`. The config holds the settings all
rows share (`export`: ExportConfig's fields less the per-row ones; `batch_sizes`, `repeats`);
each row is one ONNX file: `method` (a name in toolchain.registry), `ratio` (0 for models
without one), `centroid_bits`, `options` (the method options it was made with), sizes,
accuracy per stage, the fine-tuning curve, and after the benchmark its latencies.
"""

from __future__ import annotations

import copy

from . import registry, settings
from .errors import ConfigError

SCHEMA = 2

# Settings that files of schema 1 did not always record, with the value those files were made with.
_SCHEMA1_TEACHER = {"distill_features": 0.0, "distill_temperature": 4.0}
_SCHEMA1_NAMES = {"baseline": registry.baseline().name}  # row names that differ from the registry's


def upgrade(results: dict) -> dict:
    """A results file of any schema as today's schema (a new dict; the argument is left as it is).

    Schema 1 (no `schema` key): the baseline's rows were named "baseline"; the method options were
    recorded once in config.export.method_options, later per row; the teacher settings were not
    always recorded."""
    results = copy.deepcopy(results)
    schema = results.get("schema", 1)
    if schema > SCHEMA:
        raise ConfigError(f"the results file has schema {schema}, newer than this toolchain's ({SCHEMA}): "
                          "it was written by a newer version; use another --out or that version")
    if schema == 1:
        export = results.setdefault("config", {}).setdefault("export", {})
        shared_options = export.pop("method_options", {})
        for key, value in _SCHEMA1_TEACHER.items():
            export.setdefault(key, value)
        for row in results.get("rows", []):
            row["method"] = _SCHEMA1_NAMES.get(row["method"], row["method"])
            if "options" not in row:
                spec = registry.get(row["method"])
                impl = spec.implementation() if spec.kind == registry.MODEL else None
                row["options"] = {k: v for k, v in shared_options.items() if impl and k in impl.option_fields}
    results["schema"] = SCHEMA
    return results


def method_of(row: dict) -> registry.Method:
    return registry.get(row["method"])


def baseline_row(rows: list[dict]) -> dict:
    return next(r for r in rows if method_of(r).is_baseline)


def rows_of(rows: list[dict], method: registry.Method) -> list[dict]:
    return [r for r in rows if method_of(r) is method]


def row_allocation(row: dict) -> str:
    """How a row's model spread its filters over the layers (--allocation); uniform where not recorded."""
    return (row.get("options") or {}).get("allocation", settings.UNIFORM)
