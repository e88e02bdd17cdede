"""transformers' LOAD REPORT when a causal LM becomes a scorer: expected, so kept out of the log; any other report
passes through."""

import logging

from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_core.load_report import HEAD_SWAP, HeadSwapReport
from rlhf_core.modeling import load_scorer

TINY = LlamaConfig(
    vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=2, pad_token_id=0,
)  # fmt: skip


def report(rows: str) -> logging.LogRecord:
    text = f"\x1b[1mLlamaForSequenceClassification LOAD REPORT\x1b[0m from: /m\nKey | Status | \n---+---\n{rows}\n"
    return logging.LogRecord("transformers.modeling_utils", logging.WARNING, "", 0, text, None, None)


def test_a_causal_lm_loaded_as_a_scorer_logs_no_load_report(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(HEAD_SWAP, "told", False)  # said once per process: another test may have loaded a scorer
    LlamaForCausalLM(TINY).save_pretrained(tmp_path / "lm")
    with caplog.at_level(logging.INFO):
        scorer = load_scorer(tmp_path / "lm")
    assert scorer.score.weight.shape == (1, 16)
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]
    assert any("new scalar head" in r.getMessage() for r in caplog.records if r.name == "rlhf")


def test_only_the_head_swap_is_dropped():
    swap = HeadSwapReport()
    assert not swap.filter(report("lm_head.weight | UNEXPECTED | \nscore.weight   | MISSING    | "))
    assert swap.filter(report("model.layers.0.mlp.up_proj.weight | MISSING | "))  # a real problem stays
    assert swap.filter(report("score.weight | MISMATCH | "))
    plain = logging.LogRecord("transformers.modeling_utils", logging.WARNING, "", 0, "something else", None, None)
    assert swap.filter(plain)
