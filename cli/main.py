"""The ``surgery`` command. Commands are thin wrappers over the library; this module maps known
errors to one clear line (full traceback with ``SURGERY_DEBUG=1``)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported anywhere

import importlib  # noqa: E402
import sys  # noqa: E402

import typer  # noqa: E402

from .console import console, err_console  # noqa: E402

app = typer.Typer(
    name="surgery",
    help="Physical structured pruning for object detectors: prune, retrain, bench, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# one module per command group, each with ``register(app)``
COMMAND_MODULES = ("models_cmd", "prune_cmd", "inspect_cmd", "data_cmd", "train_cmd", "eval_cmd", "bench_cmd", "sweep_cmd",
                   "export_cmd", "quantize_cmd", "predict_cmd", "info_cmd", "recipes_cmd")


def _register() -> None:
    for optional in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f".{optional}", __package__)
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{optional}":
                raise
            continue
        mod.register(app)


_register()

from .guard import guard_commands  # noqa: E402

guard_commands(app)  # --trust-code, outputs checked before work, inputs never overwritten


def _version(value: bool) -> None:
    if value:
        from surgery import __version__  # the package's __init__ imports no torch

        console.print(f"surgery {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Physical structured pruning for object detectors: prune, retrain, bench, report."""


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds: temporaries are removed, locks released


def main() -> None:
    import signal

    from rich.markup import escape

    from surgery.errors import SurgeryError

    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()  # standalone: typer/click handle usage errors and exit codes
    except SurgeryError as e:
        if os.environ.get("SURGERY_DEBUG") == "1":
            raise
        # one line; the message quotes user strings (paths, values): never interpret them as markup
        text = " ".join(str(e).split("\n")).strip() or e.__class__.__name__
        err_console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, markup=True, soft_wrap=True)
        err_console.print("[dim](set SURGERY_DEBUG=1 for the full traceback)[/]")
        sys.exit(2)


__all__ = ["app", "main", "console"]

if __name__ == "__main__":  # python -m surgery_cli.main (installed) or cli.main (checkout)
    main()
