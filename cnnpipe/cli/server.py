"""The local UIs and the demo: `server start/stop/status` runs Prefect's and MLflow's UIs, `demo` the whole chain."""

from __future__ import annotations

import click

from cnnpipe.cli.common import before_flows, print_markdown

DEMO_MODEL = "shapes-classifier"


@click.group()
def server() -> None:
    """The Prefect and MLflow UIs over this pipeline's state, in the background on 127.0.0.1.

    While it runs, every flow command in any shell runs on it instead of starting
    Prefect's ephemeral API, unless $PREFECT_API_URL names another server. Its Prefect
    database lives under $CNNPIPE_HOME/prefect; the MLflow UI reads the store the
    commands write to ($MLFLOW_TRACKING_URI).

    \b
    Examples:
      cnnpipe server start                  # Prefect UI on :4200, MLflow UI on :5000
      cnnpipe server start --port 4300 --mlflow-port 5300
      cnnpipe server status
      cnnpipe server stop
    """


@server.command("start")
@click.option("--port", default=4200, show_default=True, help="Port of the Prefect server and its UI.")
@click.option("--mlflow-port", default=5000, show_default=True, help="Port of the MLflow UI.")
def server_start(port: int, mlflow_port: int) -> None:
    """Start both servers (whichever is not running) and print their URLs."""
    from cnnpipe.server.local_server import start

    click.echo("\n".join(start(port, mlflow_port)))


@server.command("stop")
def server_stop() -> None:
    """Stop both servers.

    Only a process whose PID, start time and command line match what `start` recorded is
    stopped; a PID file naming anything else is stale, and is removed with the program left alone."""
    from cnnpipe.server.local_server import stop

    click.echo("\n".join(stop()))


@server.command("status")
def server_status() -> None:
    """Say what runs where: both UIs, and the Prefect API flow commands use."""
    from cnnpipe.server.local_server import status

    click.echo("\n".join(status()))


@click.command()
def demo() -> None:
    """Make a small image set and run the pipeline over it.

    Writes rendered shapes (JPEG and PNG in class folders, two deliberately broken
    files, and a tar archive of more images) under $CNNPIPE_HOME/demo, ingests the
    folder into the dataset `shapes`, and trains alexnet-cifar on it on the CPU with the
    automatic recipe (no training flags: 43 epochs of batch 32, about a minute on a
    2-core CPU with AMX), logs the run to MLflow and registers `shapes-classifier`, its
    first champion if it beats the majority class. It then runs the nightly retraining
    flow once: it ingests the archive and fine-tunes the champion on the new version, a
    quarter of the epochs, promoted only if it beats the champion. It classifies the
    archive into DuckDB with the champion and ends with a SQL query, the images most like
    one of the archive's (`cnnpipe similar`), and where to look next.
    """
    from cnnpipe.cli.training import print_training
    from cnnpipe.demo import write_demo_images
    from cnnpipe.models.params import TrainingParams
    from cnnpipe.monitoring.drift import run_drift
    from cnnpipe.predictions.sql import run_query
    from cnnpipe.reports.markdown import classify_markdown, drift_markdown, ingest_markdown
    from cnnpipe.reports.output import write_result
    from cnnpipe.settings import get_settings
    from cnnpipe.store import DatasetStore
    from flows.classify import classify as classify_flow
    from flows.ingest import ingest as ingest_flow
    from flows.retrain import retrain as retrain_flow
    from flows.train import train as train_flow

    before_flows()
    settings = get_settings()
    folder, archive = write_demo_images(settings.demo_dir)
    print_markdown(ingest_markdown(ingest_flow(source=str(folder), dataset="shapes")))
    # No training flags: the automatic recipe chooses for the demo's training images.
    params = TrainingParams(registered_model=DEMO_MODEL)
    print_training(train_flow(dataset="shapes", params=params))
    # The nightly run: what is new in the archive, then a warm start from the champion just crowned.
    print_training(retrain_flow(dataset="shapes", source=str(archive), params=params))
    summary = classify_flow(source=str(archive), model=f"{DEMO_MODEL}@champion")
    print_markdown(classify_markdown(summary))
    query = ("SELECT label, count(*) AS images, round(avg(confidence), 3) AS mean_confidence "
             "FROM latest_predictions GROUP BY label ORDER BY label")
    click.echo(f'\n$ cnnpipe sql "{query}"')
    write_result(run_query(query, settings.predictions_db), "table", None)
    _show_similar(settings.predictions_db, summary)
    drift = run_drift(settings.predictions_db, summary.run_id)
    if drift:  # none when the gate kept an older champion registered before monitoring
        print_markdown(drift_markdown(drift))
        click.echo(f"Its picture, classes and confidence against the reference: "
                   f"{settings.reports_dir / 'drift' / f'{summary.run_id}.png'}")
    files = f"{DatasetStore('shapes').root}/**/*.parquet"
    click.echo(f"""
Where to look next:
  cnnpipe models {DEMO_MODEL}        versions, figures, aliases and gate decisions
  cnnpipe monitor                      drift of each classify run against the model's reference
  cnnpipe datasets show shapes
The dataset is plain Parquet; DuckDB reads it with no cnnpipe involved:
  SELECT split, label, count(*) FROM '{files}' GROUP BY ALL ORDER BY ALL;""")
    click.echo(f"\nSee it all in the UIs:\n{_demo_uis()}")


def _show_similar(database, summary) -> None:
    """The demo's `cnnpipe similar`: the images the champion sees as most like the archive's first circle."""
    from cnnpipe.predictions.similar import nearest
    from cnnpipe.predictions.sql import run_query
    from cnnpipe.reports.output import write_result

    first = run_query("SELECT image_sha256, member_path FROM embeddings JOIN predictions USING (image_sha256, "
                      f"model_name, model_version) WHERE model_name = '{summary.model_name}' AND model_version = "
                      f"'{summary.model_version}' ORDER BY member_path LIMIT 1", database).rows
    if not first:  # a champion registered before embeddings
        return
    sha, path = first[0]
    click.echo(f"\n$ cnnpipe similar {sha} --k 5      # {path}, in the archive")
    write_result(nearest(database, sha, summary.model_name, summary.model_version, 5), "table", None,
                 count_rows=False)


def _demo_uis() -> str:
    from cnnpipe.server.local_server import ui_urls

    urls = ui_urls()
    if urls is None:
        return ("  cnnpipe server start    then its Prefect UI shows these flow runs and their training report,\n"
                "                          and its MLflow UI the runs, curves, plots, model and champion")
    prefect_ui, mlflow_ui = urls
    lines = [f"  {prefect_ui}   Prefect UI: these flow runs, their logs and the training report"]
    if mlflow_ui:
        lines.append(f"  {mlflow_ui}   MLflow UI: params, curves, plots, the model and its champion alias")
    return "\n".join(lines)


COMMANDS = (server, demo)
