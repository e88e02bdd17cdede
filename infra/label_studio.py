"""Label Studio as a labeling backend, over its REST API with the standard library (no SDK).

A batch becomes tasks of a pairwise-comparison project (prompt, response A, response B; choice A, B or Tie and an
optional strength 1-4); the run's wait ends when enough tasks have ``labels_per_pair`` annotations from distinct
annotators, and the annotations come back as labels with the annotator's email as ``labeler``. Label Studio does
not check annotations against the labeling config, so one without a valid choice is skipped with a warning.

The API token comes from ``LABEL_STUDIO_API_KEY``: a personal access token (a JWT, exchanged for a short-lived
access token) or, where the organization enables them, a legacy token.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from infra.labeling import PUBLIC_COLUMNS, check_labels
from rlhf_core.labelers import HumanLabel, LabelingPair

TOKEN_ENV = "LABEL_STUDIO_API_KEY"
PAIRWISE_CONFIG = """<View>
  <Header value="Prompt"/>
  <Text name="prompt" value="$prompt"/>
  <View style="display: flex; gap: 2em">
    <View style="flex: 1"><Header value="Response A"/><Text name="response_a" value="$response_a"/></View>
    <View style="flex: 1"><Header value="Response B"/><Text name="response_b" value="$response_b"/></View>
  </View>
  <Header value="Which response is better?"/>
  <Choices name="choice" toName="prompt" choice="single-radio" required="true" showInline="true">
    <Choice value="A"/><Choice value="B"/><Choice value="Tie"/>
  </Choices>
  <Header value="How much better? 1 negligibly, 2 slightly, 3 better, 4 significantly (optional)"/>
  <Rating name="strength" toName="prompt" maxRating="4"/>
</View>"""
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
logger = logging.getLogger(__name__)


class LabelStudioError(RuntimeError):
    """Label Studio answered with an error, or could not be reached; the message names the request."""


class LabelStudio:
    """One Label Studio server, as the API user whose token is in ``LABEL_STUDIO_API_KEY``."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token or os.environ.get(TOKEN_ENV) or ""
        if not self.token:
            raise LabelStudioError(f"set {TOKEN_ENV} to a Label Studio API token (Account & Settings in its UI)")
        self._access, self._expires = "", 0.0

    def _authorization(self) -> str:
        if self.token.count(".") != 2:  # not a JWT: a legacy token
            return f"Token {self.token}"
        if time.time() > self._expires - 30:  # a personal access token buys 5-minute access tokens
            self._access = self._call("POST", "/api/token/refresh/", {"refresh": self.token}, auth=False)["access"]
            claims = self._access.split(".")[1]
            self._expires = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))["exp"]
        return f"Bearer {self._access}"

    def _call(self, method: str, path: str, body: Any = None, *, auth: bool = True, **query: Any) -> Any:
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Content-Type": "application/json"} | ({"Authorization": self._authorization()} if auth else {})
        data = None if body is None else json.dumps(body).encode()
        try:
            with _NO_PROXY.open(urllib.request.Request(url, data, headers, method=method), timeout=300) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            raise LabelStudioError(f"{method} {url}: {e.code} {e.read()[:300].decode(errors='replace')}") from e
        except OSError as e:
            raise LabelStudioError(f"{method} {url}: cannot reach Label Studio ({e})") from e
        return json.loads(payload) if payload else None

    def project(self, title: str, labels_per_pair: int) -> int:
        """The id of the project with exactly this title (created with the pairwise config if there is none),
        its overlap set to ``labels_per_pair``."""
        page = 1
        while True:  # ?title= matches substrings: compare exactly
            found = self._call("GET", "/api/projects/", title=title, page=page, page_size=100)
            if match := next((p for p in found["results"] if p["title"] == title), None):
                if match.get("maximum_annotations") != labels_per_pair:
                    self._call("PATCH", f"/api/projects/{match['id']}/", {"maximum_annotations": labels_per_pair})
                return match["id"]
            if not found.get("next"):
                break
            page += 1
        body = {"title": title, "label_config": PAIRWISE_CONFIG, "maximum_annotations": labels_per_pair}
        return self._call("POST", "/api/projects/", body)["id"]

    def import_pairs(self, project_id: int, pairs: list[LabelingPair]) -> list[int]:
        """The pairs as tasks (what people see of them only); returns the task ids."""
        tasks = [{column: getattr(p, column) for column in PUBLIC_COLUMNS} for p in pairs]
        return self._call("POST", f"/api/projects/{project_id}/import", tasks, return_task_ids="true")["task_ids"]

    def tasks(self, project_id: int) -> list[dict[str, Any]]:
        """Every task of the project with its annotations."""
        tasks: list[dict[str, Any]] = []
        page = 1
        while True:
            try:
                found = self._call("GET", "/api/tasks/", project=project_id, fields="all", page=page, page_size=500)
            except LabelStudioError as e:
                if ": 404 " in str(e):  # past the last page
                    break
                raise
            tasks += found["tasks"]
            if len(tasks) >= found["total"] or not found["tasks"]:
                break
            page += 1
        return tasks

    def emails(self) -> dict[int, str]:
        return {user["id"]: user["email"] for user in self._call("GET", "/api/users/")}

    def labels(self, project_id: int, pair_ids: set[str]) -> list[HumanLabel]:
        """The labels of the batch's tasks: one per annotator and task (the latest), annotations without a valid
        choice or strength skipped with a warning that names them."""
        emails, latest = self.emails(), {}
        for task in self.tasks(project_id):
            if task["data"].get("pair_id") not in pair_ids:
                continue
            for annotation in sorted(task["annotations"], key=lambda a: a["id"]):
                if not annotation.get("was_cancelled"):
                    row = annotation_row(task, annotation, emails)
                    latest[row["pair_id"], row["labeler"]] = (row, f"task {task['id']}, annotation {annotation['id']}")
        labels = []
        for row, where in latest.values():
            try:
                labels += check_labels([row], pair_ids, f"Label Studio {self.url} project {project_id}, {where}")[0]
            except ValueError as e:
                logger.warning("skipped: %s", e)
        return labels


def annotation_row(task: dict[str, Any], annotation: dict[str, Any], emails: dict[int, str]) -> dict[str, Any]:
    """A Label Studio annotation as a labels-file row: pair_id, choice, labeler (the annotator's email), strength."""
    row = {"pair_id": task["data"]["pair_id"], "choice": None, "strength": None}
    row["labeler"] = emails.get(annotation["completed_by"], str(annotation["completed_by"]))
    for result in annotation["result"]:
        if result.get("from_name") == "choice" and result.get("value", {}).get("choices"):
            row["choice"] = str(result["value"]["choices"][0]).lower()
        elif result.get("from_name") == "strength":
            row["strength"] = result.get("value", {}).get("rating")
    return row


def finished(labels: list[HumanLabel], pair_ids: set[str], labels_per_pair: int, fraction: float) -> bool:
    """Whether at least ``fraction`` of the pairs have ``labels_per_pair`` labels from distinct labelers."""
    labelers: dict[str, set[str]] = {}
    for label in labels:
        labelers.setdefault(label.pair_id, set()).add(label.labeler)
    done = sum(len(labelers.get(pair_id, ())) >= labels_per_pair for pair_id in pair_ids)
    return done >= fraction * len(pair_ids)


class Watcher:
    """Polls Label Studio every ``interval`` seconds in a background thread and calls ``on_finished(labels)``
    once the batch is labeled; a failed poll is logged and tried again at the next one."""

    def __init__(self, poll: Callable[[], list[HumanLabel] | None], on_finished: Callable, interval: float) -> None:
        self.poll, self.on_finished, self.interval = poll, on_finished, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="label-studio-watcher", daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                labels = self.poll()
            except LabelStudioError as e:
                logger.warning("Label Studio poll failed, trying again in %.0f s: %s", self.interval, e)
                continue
            if labels is not None:
                self.on_finished(labels)
                return
