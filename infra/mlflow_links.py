"""Links into the MLflow UI that open where a pipeline's results are: the training view.

Why: MLflow 3's UI opens an experiment on its GenAI view ("Traces", "No data available"), where a pipeline's runs do
not show; the experiment's ``mlflow.experimentKind`` tag does not change that. The UI reads ``workflowType`` from the
page's address first, then from what the browser last chose (its "Model training" toggle), and defaults to GenAI, so
every link we print or put in a report asks for the training view. No MLflow import: the CLI's quick paths use these.
"""

from __future__ import annotations

# MLflow 3's UI opens an experiment on its GenAI view ("Traces") unless the page's address asks for the training one:
# it reads ``workflowType`` from the address first, then from what the browser last chose (the "Model training"
# toggle), and defaults to GenAI. Every link we make asks for the training view.
TRAINING_VIEW = "workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default


def mlflow_ui_url(tracking_uri: str, route: str) -> str | None:
    """``route`` (``experiments/1``) in the MLflow UI of an HTTP tracking server, on the training view; None for a
    store that has no UI of its own (a SQLite file: ``mlflow ui`` serves it at ``LOCAL_UI``)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/{route}?{TRAINING_VIEW}"


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI (see :func:`mlflow_ui_url`)."""
    return mlflow_ui_url(tracking_uri, f"experiments/{experiment_id}/runs/{run_id}")


def mlflow_experiment_url(tracking_uri: str, experiment_id: str) -> str | None:
    """The experiment's runs table in the MLflow UI (see :func:`mlflow_ui_url`)."""
    return mlflow_ui_url(tracking_uri, f"experiments/{experiment_id}")


def mlflow_model_version_url(tracking_uri: str, name: str, version: str) -> str | None:
    """A registered model version's page in the MLflow UI (see :func:`mlflow_ui_url`): the champion's, say."""
    return mlflow_ui_url(tracking_uri, f"models/{name}/versions/{version}")
