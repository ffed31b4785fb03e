"""`enclaveml zoo`: list the zoo models with their measured accuracy (owner side)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("zoo")
    def zoo_cmd() -> None:
        """List the zoo models, their partition points and measured test accuracy."""
        from rich.console import Console
        from rich.table import Table

        from . import zoo

        t = Table(title="enclaveml model zoo (CIFAR-10)")
        for col in ("name", "layers", "params", "test accuracy", "description"):
            t.add_column(col)
        for name, e in zoo.ZOO.items():
            m = e.build()
            card = e.card()
            acc = f"{card['test_accuracy']:.2%}" if "test_accuracy" in card else "not trained"
            t.add_row(name, str(len(m)), f"{sum(p.numel() for p in m.parameters()):,}", acc, e.description)
        Console().print(t)
