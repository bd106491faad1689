"""``streammem eval routing``: DualMemory routing precision and recall on StreamWorld."""

from __future__ import annotations

import json
from typing import List

import typer

from streammem.cli.common import eval_app


@eval_app.command("routing")
def routing(
    presets: List[str] = typer.Option(["clean", "medium", "hard"], "--preset", help="StreamWorld presets"),
    seeds: List[int] = typer.Option([0, 1, 2, 3], "--seed", help="world seeds"),
    frames: int = typer.Option(120, help="frames per world"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Route PatchEncoder tokens by camera-compensated motion into DualMemory and compare
    the dynamic FIFO with the ground-truth moving-object masks."""
    from streammem.eval.routing import evaluate_routing

    results = [evaluate_routing(p, tuple(seeds), frames) for p in presets]
    if as_json:
        typer.echo(json.dumps([r.__dict__ for r in results], indent=2))
        return
    typer.echo("| preset | frames | dynamic cells | precision | recall | F1 | object recall |")
    typer.echo("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        typer.echo(r.row())
