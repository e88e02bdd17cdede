"""A GGUF file (llama.cpp's format, the way many instruct models ship quantized) as a base model: dequantized by
transformers into a plain fp32 model and its tokenizer, chat template included.

transformers refuses to ``save_pretrained`` a model it loaded from GGUF ("quantized with gguf and is not
serializable"), so the dequantized weights are moved into a plain model built from the same config, which saves as
safetensors like any other and gives the same logits.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

GGUF_SUFFIX = ".gguf"
GGUF_PACKAGE = "gguf==0.19.0"


def is_gguf(name_or_path: str | Path) -> bool:
    """Whether a model field names a GGUF file (by its suffix, whether or not it exists yet)."""
    return str(name_or_path).lower().endswith(GGUF_SUFFIX)


def check_gguf_file(path: str | Path, field: str) -> Path:
    """``path`` as an existing GGUF file with the ``gguf`` package installed to read it; ValueError naming ``field``
    otherwise, before any model is loaded."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"{field}={str(path)!r}: no such GGUF file")
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(
            f"{field}={str(path)!r} is a GGUF file, and reading one needs the gguf package, which is not installed "
            f"here: pip install -e '.[gguf]' (or pip install {GGUF_PACKAGE})"
        )
    return file


def load_gguf_tokenizer(path: str | Path, field: str) -> PreTrainedTokenizerBase:
    """The tokenizer stored in a GGUF file's metadata, with its chat template and special tokens."""
    file = check_gguf_file(path, field)
    return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)


def load_gguf_model(path: str | Path, field: str) -> PreTrainedModel:
    """A GGUF file's causal LM dequantized to fp32, as a plain model that ``save_pretrained`` writes as safetensors."""
    file = check_gguf_file(path, field)
    loaded = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):  # saved, it would make every later load a GGUF-quantized model again
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    return plain
