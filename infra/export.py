"""``rlhf export``: a registered policy version as a clean Hugging Face folder (safetensors weights, config,
tokenizer, generation config) with a model card that says how it was made, written whole or not at all."""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

from infra.registry import TAG_ITERATION, TAG_POLICY_DIGEST, TAG_POLICY_KEY, TAG_WEIGHTS
from infra.report import Report, iterations_markdown
from infra.storage import ObjectStore, StorageError, download_dir

_STORE_FILES = {"MANIFEST.json", ".complete"}  # the object store's bookkeeping
_LOGGED_WEIGHTS = "in MLflow"


class ExportError(Exception):
    """The export cannot be made; the message says what is missing and where."""


def fetch_policy(
    client: MlflowClient, version: Any, dest: Path, *, tracking_uri: str, store: ObjectStore | None
) -> Path:
    """The version's policy folder into ``dest``: from MLflow where its weights were logged there, else from the
    object store (verified against its manifest and the digest recorded on the version)."""
    import mlflow.artifacts

    if version.tags.get(TAG_WEIGHTS, _LOGGED_WEIGHTS) == _LOGGED_WEIGHTS:
        dest.mkdir(parents=True)
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=version.source, dst_path=str(dest), tracking_uri=tracking_uri, registry_uri=tracking_uri
            )
        )
    if store is None:
        raise ExportError(f"{version.name} version {version.version}: its weights are only in the object store")
    manifest = download_dir(store, version.tags[TAG_POLICY_KEY], dest)
    if manifest["digest"] != version.tags[TAG_POLICY_DIGEST]:
        raise ExportError(
            f"{store.full_uri(version.tags[TAG_POLICY_KEY])} has digest {manifest['digest'][:12]}.., but "
            f"{version.name} version {version.version} was registered with {version.tags[TAG_POLICY_DIGEST][:12]}..: "
            "the artifact was replaced since"
        )
    return dest


def clean_folder(source: Path, out: Path) -> None:
    """The loadable files of a policy folder: top-level weights, config and tokenizer files (no store bookkeeping,
    no LoRA adapter folder: its merge is the weights), and a generation config made from the model's where missing."""
    from transformers import AutoConfig, GenerationConfig

    out.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and path.name not in _STORE_FILES:
            shutil.copy2(path, out / path.name)
    if not any(out.glob("*.safetensors")):
        raise ExportError(f"{source}: no safetensors weights to export (found {sorted(p.name for p in out.iterdir())})")
    if not (out / "generation_config.json").exists():
        GenerationConfig.from_model_config(AutoConfig.from_pretrained(out)).save_pretrained(out)


def model_card(report: Report, version: Any) -> str:
    """The README.md: metadata for the Hub, how the policy was made, its metrics per iteration, where it came from."""
    from huggingface_hub import ModelCard, ModelCardData

    base = (report.config.get("data") or {}).get("base_model")
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["rlhf", "ppo", "instructgpt"],
        base_model=base or None,
    )
    iteration = version.tags.get(TAG_ITERATION, "?")
    lines = [
        "---",
        data.to_yaml(),
        "---",
        f"# {version.name} version {version.version} (iteration {iteration})",
        "",
        f"A causal LM post-trained with RLHF (SFT, then iterations of preference collection, a Bradley-Terry reward "
        f"model and PPO against it with a KL penalty to the SFT model). This is the policy after iteration "
        f"{iteration}. Exported {datetime.now(UTC):%Y-%m-%d %H:%M UTC}.",
        "",
        f"- **Base model**: {base or 'the built-in toy world model (generated locally)'}",
        f"- **Registered model**: {version.name}, version {version.version}, aliases "
        f"{', '.join(getattr(version, 'aliases', []) or []) or 'none'}",
        *(f"- **{label}**: {value}" for label, value in report.facts.items() if "run id" in label),
        "",
        "## Data",
        "",
        *(f"- {name}: content digest {digest}" for name, digest in report.datasets.items()),
        "",
        iterations_markdown(report).rstrip(),
        "",
        "## Config",
        "",
        "```yaml",
        yaml.safe_dump(report.config, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return str(ModelCard("\n".join(lines)))


def export_policy(
    client: MlflowClient,
    version: Any,
    out: Path,
    *,
    report: Report,
    tracking_uri: str,
    store: ObjectStore | None,
) -> Path:
    """Write the version's policy and its card to ``out``, which must not exist or be empty: built beside it and
    moved into place at the end, so a failure leaves nothing half-written."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not an empty folder: choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".rlhf-export-", dir=out.parent) as tmp:
        try:
            source = fetch_policy(client, version, Path(tmp) / "source", tracking_uri=tracking_uri, store=store)
        except (StorageError, KeyError) as e:
            raise ExportError(f"{version.name} version {version.version}: cannot fetch its policy: {e}") from e
        staged = Path(tmp) / "export"
        clean_folder(source, staged)
        (staged / "README.md").write_text(model_card(report, version))
        if out.exists():
            out.rmdir()
        staged.rename(out)
    return out


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload the exported folder to a Hub model repository (created if missing); the token comes from the
    environment or ``huggingface-cli login``, as for any Hub upload."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    return str(api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model").commit_url)
