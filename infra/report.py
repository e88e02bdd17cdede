"""The report a person reads after a run: read from MLflow (one pipeline run, or every run of a lineage), rendered once
as Markdown and sent to three places: a self-contained HTML page (``rlhf report``, plots embedded), the MLflow
pipeline run's description and artifacts, and a Prefect markdown artifact.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from mlflow.tracking import MlflowClient

from infra import catalog
from infra.mlflow_links import mlflow_experiment_url, mlflow_model_version_url, mlflow_run_url

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_ITERATION_PREFIX = f"{catalog.ITERATION.namespace}/"
COLUMNS = {  # iteration metric -> table heading, in table order
    "win_rate_vs_sft": "win rate vs SFT (gold)",
    "win_rate_stderr": "± s.e.",
    "human_win_rate_vs_sft": "win rate vs SFT (people)",
    "gold_reward": "gold reward",
    "reward": "RM score",
    "kl": "KL to SFT",
    "entropy": "entropy",
    "response_length": "length",
    "rm_val_accuracy": "RM val. accuracy",
    "labeler_agreement": "labeler agreement",
}
RM_SCORE_NOTE = (
    "The reward model is retrained and renormalized every iteration (mean 0, std 1 on the current policy's samples), "
    "so its score compares policies within one iteration, not across iterations: to follow progress, read the win "
    "rate and the gold reward, which one fixed judge gives."
)


@dataclass
class Report:
    """What the report shows, read from MLflow."""

    title: str
    rows: list[dict[str, float]]  # one per iteration: "iteration" and the iteration metrics' bare names
    samples: list[dict[str, Any]] = field(default_factory=list)  # the last iteration's, policy beside SFT
    links: dict[str, str] = field(default_factory=dict)  # label -> URL or URI
    facts: dict[str, str] = field(default_factory=dict)  # label -> value: runs, registered model, champion
    config: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, str] = field(default_factory=dict)  # name -> content digest: the runs' MLflow inputs
    generated_at: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))

    @property
    def sft_gold_reward(self) -> float:
        values = [r["sft_gold_reward"] for r in self.rows if "sft_gold_reward" in r]
        return sum(values) / len(values) if values else math.nan

    def breakdown(self) -> dict[str, tuple[float, float]]:
        """Gold attribute -> (SFT, last iteration's policy), where the judge has attributes."""
        if not self.rows:
            return {}
        last = self.rows[-1]
        names = [k.removeprefix("gold/") for k in last if k.startswith("gold/")]
        return {n: (last.get(f"sft_gold/{n}", math.nan), last[f"gold/{n}"]) for n in names}


def _iteration_rows(client: MlflowClient, run_ids: list[str]) -> list[dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for run_id in run_ids:  # oldest first: a later run's value for an iteration wins
        for key in client.get_run(run_id).data.metrics:
            if key.startswith(_ITERATION_PREFIX):
                for point in client.get_metric_history(run_id, key):
                    rows.setdefault(point.step, {"iteration": point.step})[key.removeprefix(_ITERATION_PREFIX)] = (
                        point.value
                    )
    return [rows[k] for k in sorted(rows)]


def _artifact_data(client: MlflowClient, run_id: str, path: str) -> Any:
    """A JSON or YAML artifact of the run, parsed."""
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(client.download_artifacts(run_id, path, tmp)).read_text()
    return yaml.safe_load(text) if path.endswith((".yaml", ".yml")) else json.loads(text)


def _samples(client: MlflowClient, run_id: str, iteration: int) -> list[dict[str, Any]]:
    path = catalog.SAMPLES_ARTIFACT.format(iteration=iteration)
    if not any(f.path == path for f in client.list_artifacts(run_id, path.rsplit("/", 1)[0])):
        return []
    table = _artifact_data(client, run_id, path)  # MLflow's table format: {"columns": [...], "data": [[...]]}
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]


def pipeline_runs(client: MlflowClient, experiment_id: str, lineage: str | None = None) -> list[Any]:
    """The pipeline runs of an experiment (of one lineage, if named), oldest first."""
    query = f"tags.{catalog.TAG_LINEAGE} = '{lineage}'" if lineage else ""
    runs = client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time ASC"])
    return [r for r in runs if r.data.tags.get("mlflow.runName", "").startswith("pipeline-")]


def build_report(client: MlflowClient, runs: list[Any], tracking_uri: str) -> Report:
    """The report of ``runs`` (pipeline runs, oldest first: one run, or a lineage's runs), read back from MLflow."""
    if not runs:
        raise LookupError("no pipeline run to report on")
    last = runs[-1]
    tags, run_id = last.data.tags, last.info.run_id
    rows = _iteration_rows(client, [r.info.run_id for r in runs])
    lineage = tags.get(catalog.TAG_LINEAGE) or None
    title = f"RLHF lineage {lineage}" if lineage and len(runs) > 1 else f"RLHF run {last.info.run_name}"
    links = {"MLflow run": mlflow_run_url(tracking_uri, last.info.experiment_id, run_id) or tracking_uri}
    links |= {"MLflow experiment": url} if (url := mlflow_experiment_url(tracking_uri, last.info.experiment_id)) else {}
    if catalog.TAG_CHAMPION in tags:
        champion = json.loads(tags[catalog.TAG_CHAMPION])
        url = mlflow_model_version_url(tracking_uri, champion["name"], str(champion["version"]))
        links |= {f"Champion ({champion['name']} version {champion['version']})": url} if url else {}
    links |= {
        label: tags[tag]
        for label, tag in (
            ("Prefect flow run", catalog.TAG_FLOW_RUN_URL),
            ("Artifacts", catalog.TAG_ARTIFACTS_URI),
            ("Final policy", catalog.TAG_POLICY_URI),
        )
        if tags.get(tag)
    }
    facts = {"MLflow run id": run_id, "Prefect flow run id": tags.get(catalog.TAG_FLOW_RUN, "")}
    facts |= {"Lineage": lineage} if lineage else {}
    facts |= {"Pipeline runs": str(len(runs))} if len(runs) > 1 else {}
    if catalog.TAG_REGISTERED_MODEL in tags:
        final = json.loads(tags[catalog.TAG_REGISTERED_MODEL])
        facts["Final policy's model"] = f"{final['name']} version {final['version']} (alias {final['alias']})"
    if catalog.TAG_CHAMPION in tags:
        champion = json.loads(tags[catalog.TAG_CHAMPION])
        facts["Champion"] = (
            f"{champion['name']} version {champion['version']}, iteration {champion['iteration']} "
            f"({champion['metric']} {champion['value']:.3f})"
        )
    artifacts = {f.path for f in client.list_artifacts(run_id)}
    config = _artifact_data(client, run_id, catalog.CONFIG_ARTIFACT) if catalog.CONFIG_ARTIFACT in artifacts else {}
    samples = _samples(client, run_id, int(rows[-1]["iteration"])) if rows else []
    datasets = {i.dataset.name: i.dataset.digest for run in runs for i in run.inputs.dataset_inputs}
    return Report(title=title, rows=rows, samples=samples, links=links, facts=facts, config=config, datasets=datasets)


def plot_report(report: Report) -> Figure:
    """Win rate, gold reward (policy beside SFT), RM score, KL, entropy and length across iterations (SFT at 0),
    and the gold attributes of SFT and the last policy where the judge has them."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    breakdown = report.breakdown()
    fig = Figure(figsize=(13.5, 6.4 if not breakdown else 9.6), layout="constrained")
    axes = list(fig.subplots(3 if breakdown else 2, 3, squeeze=False).flat)
    xs = [r["iteration"] for r in report.rows]

    def line(ax: Any, key: str, label: str | None = None, at_sft: float | None = None) -> None:
        points = [(x, r[key]) for x, r in zip(xs, report.rows, strict=True) if key in r]
        if at_sft is not None:
            points = [(0, at_sft), *points]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)

    panels = [
        ("win rate vs SFT", "win_rate_vs_sft", 0.5),
        ("gold reward", "gold_reward", report.sft_gold_reward),
        ("RM score (renormalized each iteration)", "reward", None),
        ("KL to SFT (nats/response)", "kl", 0.0),
        ("entropy (nats/token)", "entropy", None),
        ("response length (tokens)", "response_length", None),
    ]
    for ax, (title, key, at_sft) in zip(axes, panels, strict=False):
        line(ax, key, "policy", at_sft)
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("iteration (0 = SFT)" if at_sft is not None else "iteration")
        ax.grid(alpha=0.3)
    axes[0].axhline(0.5, color="grey", linestyle=":", linewidth=1)
    line(axes[0], "human_win_rate_vs_sft", "people")
    line(axes[1], "sft_gold_reward", "SFT")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    if breakdown:
        ax = axes[6]
        names = list(breakdown)
        ax.bar([i - 0.2 for i in range(len(names))], [breakdown[n][0] for n in names], 0.4, label="SFT")
        ax.bar([i + 0.2 for i in range(len(names))], [breakdown[n][1] for n in names], 0.4, label="policy (last)")
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_title("gold reward by attribute")
        ax.legend(fontsize=8)
        for unused in axes[7:]:
            unused.set_visible(False)
    return fig


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def _cell(value: Any, width: int = 0) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value) if value is not None else ""
    if width and len(text) > width:
        text = text[: width - 1] + "…"
    return html.escape(text).replace("|", "\\|").replace("\n", " ") or " "


def _table(headings: list[str], rows: list[list[Any]], width: int = 0) -> list[str]:
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    return lines + ["| " + " | ".join(_cell(v, width) for v in row) + " |" for row in rows]


def iterations_markdown(report: Report) -> str:
    """The per-iteration table (SFT first) and what its RM score means."""
    columns = [c for c in COLUMNS if any(c in r for r in report.rows)]
    at_sft = {"win_rate_vs_sft": 0.5, "gold_reward": report.sft_gold_reward, "kl": 0.0}
    rows = [["SFT", *[at_sft.get(c, "–") for c in columns]]]
    rows += [[int(r["iteration"]), *[r.get(c, "–") for c in columns]] for r in report.rows]
    lines = ["## Iterations", "", *_table(["iteration", *[COLUMNS[c] for c in columns]], rows)]
    return "\n".join([*lines, "", f"*RM score*: {RM_SCORE_NOTE}"]) + "\n"


def render_markdown(report: Report, *, plot_src: str | None = None, max_samples: int = 8, width: int = 0) -> str:
    """The report as Markdown. ``plot_src``: where the plots image is (a data URI for a self-contained page);
    ``width`` cuts long sample texts, for destinations with a size limit."""
    lines = [f"# {_cell(report.title)}", "", f"Generated {report.generated_at}."]
    if report.rows:
        last = report.rows[-1]
        headline = (
            f"After iteration {int(last['iteration'])}, the policy wins {last['win_rate_vs_sft']:.1%} of "
            f"held-out prompts against the SFT model (gold judge; 50% is a draw)"
        )
        if "human_win_rate_vs_sft" in last:
            headline += f", {last['human_win_rate_vs_sft']:.1%} by people's judgment"
        lines += ["", headline + f"; KL to SFT {last['kl']:.2f} nats per response."]
    lines += ["", *(f"- **{label}**: {_cell(value)}" for label, value in report.facts.items())]
    for label, target in report.links.items():
        is_url = target.startswith(("http://", "https://", "file://"))
        lines.append(f"- **{label}**: " + (f"[{_cell(target)}]({target})" if is_url else f"`{target}`"))
    lines += ["", iterations_markdown(report).rstrip()]
    if plot_src:
        lines += [
            "",
            "## Plots",
            "",
            f"![win rate, gold reward, RM score, KL, entropy and length by iteration]({plot_src})",
        ]
    if breakdown := report.breakdown():
        lines += ["", "## Gold reward by attribute (last iteration)", ""]
        lines += _table(["attribute", "SFT", "policy", "change"], [[n, s, p, p - s] for n, (s, p) in breakdown.items()])
    if report.samples:
        lines += ["", "## Sample completions (last iteration, held-out prompts)", ""]
        rows = [
            [s.get("prompt"), s.get("policy"), s.get("policy_gold", "–"), s.get("sft"), s.get("sft_gold", "–")]
            for s in report.samples[:max_samples]
        ]
        lines += _table(["prompt", "policy", "gold", "SFT", "gold"], rows, width)
    if report.datasets:
        lines += ["", "## Datasets (MLflow run inputs)", ""]
        lines += _table(["dataset", "content digest"], [[n, d] for n, d in report.datasets.items()])
    if report.config:
        lines += ["", "## Config", "", "```yaml", yaml.safe_dump(report.config, sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; }
pre { background: #f5f5f5; padding: 1em; overflow-x: auto; font-size: 12px; }
"""


def render_html(report: Report, plot_png: bytes | None = None) -> str:
    """The report as one self-contained HTML page: the plots are embedded (``plot_png``, where the caller rendered
    :func:`plot_report` already), nothing is fetched."""
    import markdown

    png = plot_png if plot_png is not None else figure_png(plot_report(report))
    src = "data:image/png;base64," + base64.b64encode(png).decode()
    body = markdown.markdown(
        render_markdown(report, plot_src=src, max_samples=16), extensions=["tables", "fenced_code"]
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(report.title)}</title>'
        f"<style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def note_markdown(report: Report, limit: int) -> str:
    """The Markdown for a destination that holds at most ``limit`` characters (MLflow's run description): sample
    texts cut and fewer samples until it fits; the config is left to the run's params and config.yaml."""
    report = Report(**{**report.__dict__, "config": {}})
    for max_samples, width in ((8, 120), (4, 80), (2, 60), (0, 0)):
        text = render_markdown(report, max_samples=max_samples, width=width)
        if len(text) <= limit:
            return text
    return text[: limit - 1] + "…"
