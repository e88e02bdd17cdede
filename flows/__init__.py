"""Prefect flows. Importing the package sets the local defaults before Prefect reads its settings."""

import os

# No server to start and no network: Prefect's temporary server, without analytics. Its first start
# migrates a fresh database, which on a busy 2-core machine can take longer than the default 20 s.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
