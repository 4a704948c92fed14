"""`launch`: start the local processes of one multi-process run (gemstill.launch does the work)."""

from __future__ import annotations

from typing import Annotated

import typer

LAUNCH_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}  # the command to start follows `--`


def launch(
    ctx: typer.Context,
    processes: Annotated[int, typer.Option(help="how many processes to start")],
    devices_per_process: Annotated[
        int | None, typer.Option(help="devices each process gets: host devices on CPU, its own GPUs on a GPU node")
    ] = None,
    port: Annotated[int | None, typer.Option(help="coordinator port on 127.0.0.1 (default: a free one)")] = None,
) -> None:
    """Start N local processes of one multi-process run: gemstill launch --processes 2 -- gemstill run PROFILE."""
    from gemstill.launch import launch as start_processes

    code = start_processes(ctx.args, processes, devices_per_process, port)
    if code:
        raise typer.Exit(code if code > 0 else 128 - code)  # killed by signal N: 128 + N, as a shell reports it
