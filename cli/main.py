"""The `digiq` command: one sub-command per DVC stage plus data, feature and report utilities.

Modules under digiq.cli import only typer at the top; heavy libraries load inside the commands so
that `digiq --help` stays fast.
"""

from __future__ import annotations

import typer

from digiq import __version__
from digiq.cli import actor as actor_cli
from digiq.cli import bench as bench_cli
from digiq.cli import candidates as candidates_cli
from digiq.cli import channels as channels_cli
from digiq.cli import collect as collect_cli
from digiq.cli import critic as critic_cli
from digiq.cli import data as data_cli
from digiq.cli import doctor as doctor_cli
from digiq.cli import embed as embed_cli
from digiq.cli import evaluate as evaluate_cli
from digiq.cli import features as features_cli
from digiq.cli import finetune as finetune_cli
from digiq.cli import label as label_cli
from digiq.cli import model as model_cli
from digiq.cli import params as params_cli
from digiq.cli import report as report_cli
from digiq.cli import view as view_cli

app = typer.Typer(
    name="digiq",
    help="Digi-Q, reproducible: collect → label → finetune → candidates → embed → channels → features → critic → actor → evaluate → report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode=None,  # help texts quote "[params: …]"; rich markup would swallow the brackets
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"digiq {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Run `digiq COMMAND --help` for each stage's options; every default comes from params.yaml."""


app.add_typer(data_cli.app, name="data", help="Inspect a trajectory dataset (stats, show, regime).")
app.add_typer(model_cli.app, name="model", help="Build the default VLM; summarise a checkpoint folder.")
app.add_typer(features_cli.app, name="features", help="Feast feature store: materialize frozen features, read them online.")
data_cli.register(app)
collect_cli.register(app)
label_cli.register(app)
finetune_cli.register(app)
candidates_cli.register(app)
embed_cli.register(app)
channels_cli.register(app)
critic_cli.register(app)
actor_cli.register(app)
evaluate_cli.register(app)
report_cli.register(app)
view_cli.register(app)
doctor_cli.register(app)
params_cli.register(app)
bench_cli.register(app)

if __name__ == "__main__":
    app()
