"""Where the pipeline's data comes from: the built-in toy world by default, or the user's prompts, demonstrations,
preferences, gold judge and models."""

from __future__ import annotations

import importlib
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rlhf_core import world
from rlhf_core.types import GoldBreakdown, GoldScorer
from rlhf_core.world import WorldConfig

_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class DataConfig(BaseModel):
    """Where prompts, demonstrations, the gold judge and the base model come from (default: the toy world)."""

    model_config = ConfigDict(extra="forbid")
    world: WorldConfig = Field(
        default_factory=WorldConfig, description="Size of the generated toy world and of its tiny Llama."
    )
    base_model: str | None = Field(
        None,
        description="Start from this causal LM (hub id or local save_pretrained folder, any architecture) instead "
        "of the toy world's tiny Llama; its own tokenizer is used. Null: build the tiny Llama.",
    )
    reward_model: str | None = Field(
        None,
        description="Start the reward model from this model instead of the SFT model (hub id or local "
        "save_pretrained folder, any architecture) with its own tokenizer: text is re-tokenized for it, and PPO's "
        "critic then starts from the SFT model. Null: the reward model and the critic start from the SFT model.",
    )
    prompts: str | None = Field(
        None,
        description="Your prompts, from a source (a .parquet/.jsonl/.csv file, hf://OWNER/NAME[@REVISION][:SPLIT], "
        "a dataset folder[:SPLIT] or s3://BUCKET/KEY.parquet): a 'prompt' column (text, or chat messages) or "
        "'messages', and an optional 'split' column (preference, ppo or eval); without it a prompt's split comes "
        "from a hash of its text (40% preference, 40% ppo, 20% eval). Needs data.demonstrations and "
        "data.gold_reward. Null: the toy world's.",
    )
    demonstrations: str | None = Field(
        None,
        description="Your SFT demonstrations, from a source as for data.prompts: 'prompt' and 'response' (or TRL's "
        "prompt/completion), or 'messages' ending with the answer. Goes with data.prompts.",
    )
    human_preferences: str | None = Field(
        None,
        description="Human preference pairs, from a source as for data.prompts: 'prompt', 'chosen' and 'rejected' "
        "(TRL's preference format), or 'chosen'/'rejected' holding whole conversations (text as in HH-RLHF, or "
        "lists of {role, content}) whose shared start is the prompt; added to every reward model's training data.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Our column name -> yours, for sources with other names, e.g. {prompt: question, response: "
        "answer}; applied to every data source before its format is recognized.",
    )
    dataset_config: str | None = Field(
        None, description="The configuration (load_dataset's name) of hub or dataset-folder sources that have several."
    )
    chat_template: bool = Field(
        True,
        description="Where the base model's tokenizer has a chat template, format every prompt of your data through "
        "it (a text prompt as one user turn, with the generation prompt), so that SFT, sampling, reward scoring and "
        "evaluation all see the model's chat format; false: text prompts as written and messages joined.",
    )
    gold_reward: str | None = Field(
        None,
        description="'package.module:function' taking (prompts, responses) and returning one float per response: "
        "the hidden judge of the simulated labelers and of evaluation. Required with data.prompts; null: the toy "
        "world's gold reward, which only knows toy prompts.",
    )

    @field_validator("gold_reward")
    @classmethod
    def _import_path(cls, spec: str | None) -> str | None:
        if spec is not None and not _IMPORT_PATH.fullmatch(spec):
            raise ValueError(f"expected 'package.module:function', got {spec!r}")
        return spec

    @model_validator(mode="after")
    def _user_data_goes_together(self) -> DataConfig:
        if (self.prompts is None) != (self.demonstrations is None):
            missing = "data.demonstrations" if self.demonstrations is None else "data.prompts"
            raise ValueError(f"{missing} is required too: your prompts and demonstrations go together")
        if self.prompts is not None and self.gold_reward is None:
            raise ValueError(
                "data.gold_reward is required with data.prompts: the toy world's gold reward only judges toy prompts"
            )
        return self

    @property
    def user_sources(self) -> dict[str, str]:
        """The user's data sources by field name."""
        sources = {
            "prompts": self.prompts,
            "demonstrations": self.demonstrations,
            "human_preferences": self.human_preferences,
        }
        return {name: spec for name, spec in sources.items() if spec is not None}


def load_gold_scorer(spec: str | None) -> GoldScorer:
    """The gold judge named ``'package.module:function'``, or the toy world's for None."""
    if spec is None:
        return world.gold_rewards
    module_name, _, attr = spec.partition(":")
    try:
        scorer = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise ValueError(
            f"data.gold_reward={spec!r}: cannot import it: {e}; put the folder that holds {module_name!r} on "
            f"PYTHONPATH (e.g. PYTHONPATH=/path/to/that/folder rlhf run ...)"
        ) from e
    except AttributeError as e:
        raise ValueError(f"data.gold_reward={spec!r}: cannot import it: {e}") from e
    if not callable(scorer):
        raise ValueError(f"data.gold_reward={spec!r}: not a function")
    return scorer


def load_gold_breakdown(spec: str | None) -> GoldBreakdown | None:
    """The judge's reward attribute by attribute where it has attributes: the toy world's (for None) does."""
    return world.gold_components if spec is None else None
