"""Where each registry of names lives, so the recipe (the lowest layer) can validate names it cannot import.

A registry is a module-level dict in the layer that owns the objects (blocks in `remote.diffseg_unet`, data
sources in `data.sources`, ...); its keys are the only list of those names. This module holds nothing but
the registries' addresses: a registry is imported on the first lookup, never when this module is. It is the
one place in diffseg_hf that imports by string (tests/test_architecture.py checks that, and that every
address exists); everything else imports along the layer order.

A recipe field names its registry in its metadata, `field(default=..., metadata={"registry": "sampler"})`;
`diffseg_hf.recipe` then checks every value with `check` when the recipe loads.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from typing import Any, NamedTuple

from .errors import RecipeError


class Registry(NamedTuple):
    module: str  # absolute module name
    attribute: str  # the dict in it: name -> object
    noun: str  # what a key names, for messages: "block type", "data source"
    args: str | None = None  # a dict in the same module: names written as NAME:ARG -> the ARG placeholder


REGISTRIES: dict[str, Registry] = {
    "block": Registry("diffseg_hf.remote.diffseg_unet", "RESIDUAL_BLOCKS", "block type"),
    "data source": Registry("diffseg_hf.data.sources", "IMAGE_SOURCES", "data source", args="SOURCE_ARGS"),
    "noise schedule": Registry("diffseg_hf.schedule", "SCHEDULES", "noise schedule"),
    "sampler": Registry("diffseg_hf.schedule", "SAMPLERS", "sampler"),
    "segmentation dataset": Registry("diffseg_hf.data.segmentation", "SEG_DATASETS", "segmentation dataset",
                                     args="SEG_DATASET_ARGS"),
    "readout head": Registry("diffseg_hf.readout_config", "READOUT_HEADS", "readout head"),
    "segment preset": Registry("diffseg_hf.recipe", "SEGMENT_PRESETS", "segment preset"),
    "vote": Registry("diffseg_hf.remote.pixel_ensemble", "VOTES", "vote"),
    "noise protocol": Registry("diffseg_hf.remote.pipeline_diffseg_segmentation", "NOISE_PROTOCOLS",
                               "noise protocol"),
}


def _entry(registry: str) -> Registry:
    assert registry in REGISTRIES, f"no registry {registry!r}; known: {', '.join(REGISTRIES)}"
    return REGISTRIES[registry]


def lookup(registry: str) -> Mapping[str, Any]:
    """The registry itself (name -> object; a tuple of names where the registry holds names only)."""
    entry = _entry(registry)
    table = getattr(importlib.import_module(entry.module), entry.attribute)
    return table if isinstance(table, Mapping) else dict.fromkeys(table)


def _args(registry: str) -> Mapping[str, str]:
    entry = _entry(registry)
    return getattr(importlib.import_module(entry.module), entry.args) if entry.args else {}


def choices(registry: str) -> list[str]:
    """The names as a user writes them, in registry order: fashion-mnist, ..., imagefolder:PATH, hub:ID."""
    args = _args(registry)
    return [f"{name}:{args[name]}" if name in args else name for name in lookup(registry)]


def is_valid(registry: str, value: str) -> bool:
    args = _args(registry)
    name, sep, arg = value.partition(":") if args else (value, "", "")
    return name in lookup(registry) and (not arg or name in args)


def explain(registry: str, value: Any) -> str:
    """Why `value` is not a name of the registry: "'x' is not one of a, b; did you mean 'a'?"."""
    args = _args(registry)
    name, sep, arg = str(value).partition(":") if args else (str(value), "", "")
    close = difflib.get_close_matches(name, list(lookup(registry)), n=1)
    hint = ""
    if close and close[0] != name:
        hint = f"; did you mean {close[0] + (sep + arg if close[0] in args else '')!r}?"
    elif name in lookup(registry) and arg:
        hint = f"; {name} takes no argument"
    return f"{value!r} is not one of {', '.join(choices(registry))}{hint}"


def check(registry: str, value: Any, path: str) -> None:
    """RecipeError naming the key path unless `value` is a name of the registry."""
    if not isinstance(value, str) or not is_valid(registry, value):
        raise RecipeError(f"{path}: {explain(registry, value)}")
