"""Typed configuration shared by every stage, loaded from YAML once at the edge (CLI or job).

Each stage keeps its own dataclass next to its code (``rlsim.reward.config`` and so on);
this module holds what they share: where the data is and which split to use.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rlsim.errors import ConfigError

T = TypeVar("T")


@dataclass
class DataConfig:
    """Which dataset, where it lives, and how it is split."""

    dataset: str = "ml-100k"
    # Folder holding the dataset folder (or the dataset files themselves); None means cache_dir.
    data_dir: str | None = None
    # Parquet caches, embeddings, downloaded archives.
    cache_dir: str = "~/.cache/rlsim"
    split: str = "u1"
    # Plot overviews CSV; None means <data_dir>/overviews/<dataset>_overviews.csv when present.
    overviews: str | None = None
    download: bool = True
    seed: int = 0
    # Share of each user's ratings held out by the temporal and random splits.
    test_frac: float = 0.2
    text_model: str = "all-MiniLM-L6-v2"

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser()


def _resolve_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build a (possibly nested) dataclass from a dict, rejecting unknown keys by name."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config section '{where or cls.__name__}' must be a mapping, got {type(data).__name__}")
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in config section '{where or cls.__name__}'")
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            continue
        value = data[f.name]
        tp = _resolve_type(hints[f.name])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value, f"{where}.{f.name}" if where else f.name)
        elif tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif tp in (int, float, str, bool) and value is not None and not isinstance(value, tp):
            raise ConfigError(
                f"config key '{where + '.' if where else ''}{f.name}' must be {tp.__name__}, got {value!r}"
            )
        kwargs[f.name] = value
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at top level")
    return data


def dump_yaml(obj: Any, path: str | Path) -> None:
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


__all__ = ["DataConfig", "from_dict", "to_dict", "load_yaml", "dump_yaml", "field"]
