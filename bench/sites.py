"""Config trees for the gateways a run starts: the repository's config.yaml and templates, patched."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from bench.procs import ROOT

#: what every benchmarked gateway changes from the shipped config
BENCH_PATCH: dict[str, Any] = {
    # distinct addresses are used anyway; the cap must not turn a long run into refusals
    "email": {"per_recipient_hourly_cap": 1_000_000},
}


def deep_merge(base: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def write_site(directory: Path, patch: Mapping[str, Any]) -> Path:
    """`directory/config.yaml` (with templates/ beside it): the shipped config, BENCH_PATCH, `patch`."""
    directory.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    data = deep_merge(
        deep_merge(base, BENCH_PATCH), {"store": {"database_url": f"sqlite:///{directory}/gateway.db"}}
    )
    data = deep_merge(data, patch)
    if not (directory / "templates").exists():
        shutil.copytree(ROOT / "templates", directory / "templates")
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path
