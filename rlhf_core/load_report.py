"""transformers' LOAD REPORT, kept out of the logs where all it says is what making a scorer of a causal LM does.

Why: a reward model or critic is loaded from a causal LM checkpoint as a sequence classifier, so transformers
reports ``lm_head.weight UNEXPECTED`` and ``score.weight MISSING``, as a warning, with raw terminal colour codes in
a served run's log. That reads like an error, and it is the expected outcome: the language-model head is dropped
and a new scalar head starts fresh. A report that names any other key is a real problem and passes through.
"""

from __future__ import annotations

import logging
import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ROW = re.compile(r"^\s*([\w.\-]+)\s*\|\s*(UNEXPECTED|MISSING|MISMATCH)\b")
SCORER_HEADS = ("lm_head", "score")  # the head a causal LM drops, and the scalar head a scorer gets
said = logging.getLogger("rlhf")


class HeadSwapReport(logging.Filter):
    """Drops a LOAD REPORT whose every row is a causal LM's head left out or a scalar head made anew; says once, at
    INFO on the ``rlhf`` logger, that this is expected."""

    def __init__(self) -> None:
        super().__init__()
        self.told = False

    def filter(self, record: logging.LogRecord) -> bool:
        text = _ANSI.sub("", record.getMessage())
        if "LOAD REPORT" not in text:
            return True
        rows = [m.groups() for m in map(_ROW.match, text.splitlines()) if m]
        if not rows or any(key.split(".")[0] not in SCORER_HEADS or status == "MISMATCH" for key, status in rows):
            return True
        if not self.told:
            said.info("a scorer made from a causal LM: its lm_head is left out and a new scalar head starts (expected)")
            self.told = True
        return False


HEAD_SWAP = HeadSwapReport()


def quiet_head_swap_reports() -> None:
    """Install :class:`HeadSwapReport` on the logger transformers reports loading on (once; idempotent)."""
    logging.getLogger("transformers.modeling_utils").addFilter(HEAD_SWAP)
