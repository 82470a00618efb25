"""The ``surgery`` command. Commands are thin wrappers over the library; this module maps known
errors to one clear line (full traceback with ``SURGERY_DEBUG=1``)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported anywhere

import importlib  # noqa: E402
import sys  # noqa: E402

import typer  # noqa: E402

from .console import LINE_LIMIT, console, err_console, shown  # noqa: E402

app = typer.Typer(
    name="surgery",
    help="Physical structured pruning for object detectors: prune, retrain, bench, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# one module per command group, each with ``register(app)``
COMMAND_MODULES = ("models_cmd", "prune_cmd", "inspect_cmd", "data_cmd", "train_cmd", "eval_cmd", "bench_cmd", "sweep_cmd",
                   "export_cmd", "quantize_cmd", "predict_cmd", "info_cmd", "recipes_cmd",
                   "sensitivity_cmd", "sparsify_cmd", "recover_cmd", "compress_cmd")


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

guard_commands(app)  # --trust-code, --overwrite, outputs checked before work, inputs never overwritten


def _switches_as_switches() -> None:
    """Typer's help prints every flag, ``--help`` included, as ``--trust-code <bool>`` although a flag
    takes no value: its type column is left empty instead, so switches read as switches. (Typer
    builds its help options itself, so a per-option metavar cannot reach ``--help``.)"""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "_surgery_switches", False):  # older typer: nothing to fix
        return

    def display_type_rich(self: TyperOption, ctx: typer.Context) -> str | None:
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    display_type_rich._surgery_switches = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_switches_as_switches()


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

    from surgery.errors import SurgeryError

    usage_error = typer.BadParameter.__mro__[1]  # click's UsageError (typer >= 0.20 vendors click)
    click_error = usage_error.__mro__[1]  # click's ClickException

    signal.signal(signal.SIGTERM, _terminate)
    try:
        # not standalone: click's usage errors come here and print like ours (no boxed panels)
        code = app(standalone_mode=False, prog_name="surgery")
    except usage_error as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `surgery` / `surgery data`: the help, not an error
            e.show()
            sys.exit(0)
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        _error_line(f"{e.format_message()}{where}")
        sys.exit(2)
    except click_error as e:
        _error_line(e.format_message())
        sys.exit(e.exit_code)
    except typer.Abort:
        err_console.print("Aborted.", highlight=False)
        sys.exit(1)
    except SurgeryError as e:
        if os.environ.get("SURGERY_DEBUG") == "1":
            raise
        _error_line(str(e) or e.__class__.__name__)  # SURGERY_DEBUG=1 shows the traceback (README)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def _error_line(text: str) -> None:
    """The one error style: ``error: ...`` on one line of stderr. The message quotes user strings
    (paths, values, names from files): never interpret them as markup or control characters."""
    err_console.print(f"[bold red]error:[/] {shown(' '.join(text.split()), LINE_LIMIT)}", highlight=False, markup=True,
                      soft_wrap=True)  # fmt: skip


__all__ = ["app", "main", "console"]

if __name__ == "__main__":  # python -m surgery_cli.main (installed) or cli.main (checkout)
    main()
