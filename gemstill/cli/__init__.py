"""The `gemstill` command line, one module per command group, each a thin layer over library functions:

- models (`models.py`): `info` (config, parameter counts, memory), `score`, `generate`, `export`;
- pipelines (`pipeline.py`): `run` a profile's pipeline in-process on Prefect, `status`, `report`, `cache stats`;
- multi-process runs (`launch.py`): `launch`;
- evaluation (`evaluate.py`): `eval reasoning`, `eval nightly`, `eval history`.

Heavy modules (JAX, Prefect, the flows) are imported inside the commands, so `gemstill --help` stays fast. Errors
print one line and exit non-zero (`main`).
"""

from __future__ import annotations

import signal
import sys

import typer
from typer._click import exceptions as click  # typer carries its own click; its errors live here

from gemstill import interrupt
from gemstill.cli import evaluate, launch, models, pipeline
from gemstill.errors import GemstillError

app = typer.Typer(
    name="gemstill",
    help="Distill Gemma 3 models. Model specs: gguf:PATH, hf:DIR, orbax:DIR, gemma3-270m.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# the order `gemstill --help` lists them in
app.command()(models.score)
app.command()(models.generate)
app.command()(models.info)
app.command()(models.export)
app.command()(pipeline.run)
app.command(context_settings=launch.LAUNCH_SETTINGS)(launch.launch)
app.command()(pipeline.status)
app.command()(pipeline.report)
app.add_typer(pipeline.cache_app, name="cache")
app.add_typer(evaluate.eval_app, name="eval")


def main() -> None:
    """Entry point: GemstillError becomes one line on stderr and exit code 1, never a traceback; SIGINT and SIGTERM
    stop any command within seconds with 130 / 143 (gemstill.interrupt)."""
    with interrupt.interruptible():
        try:
            code = app(standalone_mode=False)
        except click.NoArgsIsHelpError as usage:
            print(usage.format_message(), file=sys.stderr)
            sys.exit(2)
        except click.UsageError as usage:  # a bad option: one line naming it, as every other error
            command = usage.ctx.command_path if usage.ctx is not None else "gemstill"
            interrupt.print_error(f"{usage.format_message().rstrip('.')}; see {command} --help")
            sys.exit(1)
        except click.ClickException as failure:
            interrupt.print_error(failure.format_message())
            sys.exit(failure.exit_code)
        except typer.Abort:
            interrupt.exit_now(signal.SIGINT)
        except GemstillError as error:
            # plain text: a message is data, never markup (`[student, teacher]` and `[/` print as written)
            interrupt.print_error(" ".join(str(error).split()))
            sys.exit(1)
        except (interrupt.Interrupted, KeyboardInterrupt) as stop:
            interrupt.exit_now(getattr(stop, "signum", signal.SIGINT))
        if isinstance(code, int) and code:
            sys.exit(code)
