"""Shared CLI plumbing: one-line user errors, the recipe options, and options whose choices come from a registry."""

from __future__ import annotations

import functools
import os
from typing import Callable

import typer

from diffseg_hf import registries
from diffseg_hf.errors import DiffsegError

DEBUG_VAR = "DIFFSEG_DEBUG"


def command(group: typer.Typer, name: str | None = None, **kwargs) -> Callable:
    """`group.command` that turns a DiffsegError into one line on stderr and its exit code (2; 130 for Ctrl-C)."""
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                return fn(*args, **kw)
            except DiffsegError as e:
                if os.environ.get(DEBUG_VAR):
                    raise
                if e.exit_code == 2:
                    typer.echo(f"error: {e}  (set {DEBUG_VAR}=1 for the traceback)", err=True)
                else:
                    typer.echo(str(e), err=True)
                raise typer.Exit(e.exit_code) from None
        return group.command(name, **kwargs)(wrapper)
    return decorate


def recipe_option():
    return typer.Option(..., "--recipe", "-r", help="a shipped recipe name (see `diffseg recipes`) or a .yaml path")


def set_option():
    return typer.Option(None, "--set", help="override a recipe value: --set train.lr=2e-4 (repeatable)")


def registry_callback(registry: str) -> Callable[[str | None], str | None]:
    """An option callback accepting only names of the registry (NAME:ARG forms included, as in recipes); the
    error lists them, with a "did you mean"."""
    def check(value: str | None) -> str | None:
        if value is not None and not registries.is_valid(registry, value):
            raise typer.BadParameter(registries.explain(registry, value))
        return value
    return check


def registry_help(registry: str) -> str:
    """The registry's names for help texts, read when the CLI module is imported."""
    return ", ".join(registries.choices(registry))
