"""Prefect deployments of a flow whose one parameter is a pydantic config model.

The deployment's parameter schema is the config model's JSON schema (Prefect derives it from the flow's
signature), so the UI's "Custom run" form lists every field with its description and default; the config given
here becomes the deployment's default parameters. ``rlhf serve`` builds one with :func:`build_deployment` and
runs it in-process with :func:`serve`; ``prefect.yaml`` describes the same deployment for a process work pool.

This module takes the flow as an argument (it never imports ``flows``), so the layering stays one-way.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment

__all__ = ["DeploymentError", "build_deployment", "deployment_parameters", "serve"]


class DeploymentError(ValueError):
    """A deployment that cannot be built as asked; the message names the option."""


def deployment_parameters(flow: Flow[..., Any], config: BaseModel) -> dict[str, Any]:
    """``{<the flow's one parameter>: config as JSON}``: the deployment's default parameters."""
    names = list(flow.parameters.properties)
    if len(names) != 1:
        raise DeploymentError(f"flow {flow.name!r} must take exactly one parameter (its config), has {names}")
    return {names[0]: config.model_dump(mode="json")}


def build_deployment(
    flow: Flow[..., Any],
    config: BaseModel,
    *,
    name: str,
    cron: str | None = None,
    interval: float | None = None,
    tags: list[str] | None = None,
    concurrency_limit: int | None = None,
) -> RunnerDeployment:
    """A deployment of ``flow`` with ``config`` as its default parameters and an optional cron or interval schedule.

    ``concurrency_limit`` caps the deployment's simultaneous runs; further runs wait for a slot (Prefect's
    ENQUEUE collision strategy) instead of starting. The entrypoint is the flow's module path, so the served
    process and its flow-run subprocesses import the installed package whatever the working directory.
    """
    from prefect.deployments.runner import EntrypointType

    if cron and interval is not None:
        raise DeploymentError("give a cron expression or an interval, not both")
    if interval is not None and interval <= 0:
        raise DeploymentError(f"the interval must be a positive number of seconds, got {interval}")
    if cron:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=cron)
        except ValidationError as e:
            raise DeploymentError(f"invalid cron expression {cron!r}: e.g. '0 3 * * *' (daily at 03:00)") from e
    description = flow.description.strip().splitlines()[0] if flow.description else None
    return flow.to_deployment(
        name=name,
        cron=cron or None,
        interval=interval,
        parameters=deployment_parameters(flow, config),
        description=description,
        tags=tags or [],
        concurrency_limit=concurrency_limit,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve(*deployments: RunnerDeployment, limit: int | None = None) -> None:
    """Register the deployments and run their scheduled and manually started flow runs here, until interrupted.

    Needs a Prefect server that outlives this process (``PREFECT_API_URL``); without one, Prefect would start a
    temporary server that nothing else can reach."""
    from prefect import serve as prefect_serve

    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise DeploymentError(
                "no PREFECT_API_URL: start a server (`rlhf stack up`, or `prefect server start`) and export "
                "PREFECT_API_URL=http://HOST:PORT/api so the UI and `prefect deployment run` reach the deployment"
            )
    prefect_serve(*deployments, limit=limit)
