"""Typer command line of diffseg-hf (installed as the `diffseg_cli` package; console script `diffseg`)."""
