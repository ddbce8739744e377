"""The `diffseg` command line. This module only registers commands; each is a thin shell over a library
function. User errors (`DiffsegError`) print one line and exit 2; set DIFFSEG_DEBUG=1 for the traceback."""

from __future__ import annotations

import typer

from diffseg_hf import allocator

from . import ddpm, evaluate, hub, segment

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train DDPMs with diffusers and turn their decoder features into segmenters.")
for module in (ddpm, hub, evaluate):
    app.registered_commands += module.app.registered_commands
    app.registered_groups += module.app.registered_groups
app.add_typer(segment.app, name="segment")


def main() -> None:
    allocator.keep_freed_memory()  # process-wide: the commands' large CPU tensors stop page-faulting
    app()


if __name__ == "__main__":
    main()
