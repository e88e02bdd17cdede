"""The instruction-following task's gold judge: the share of a prompt's constraints a response follows.

What: ``score(prompts, responses)`` gives each response the fraction of its prompt's constraints it follows under
IFEval's strict check (IFBench's checkers for IFBench prompts); ``score_loose`` the same under the loose check
(the response also passes if it does with its first and/or last line dropped, or with markdown asterisks
removed); ``breakdown`` both plus each constraint's result. Each prompt's constraints come from the table
``constraints.jsonl`` that ``instructions.py`` writes, in the folder ``$RLHF_IF_DATA`` or else ``build/`` beside
this file. Use it as ``data.gold_reward: instruction_judge:score`` with this folder on PYTHONPATH.

Why: a program grades the policy, so the preference labels, the RL reward and every win rate share one exact
standard. A fraction rather than all-or-nothing gives partial credit, which makes a smoother reward.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA_ENV = "RLHF_IF_DATA"
"""The environment variable naming the folder that holds constraints.jsonl."""

TABLE_NAME = "constraints.jsonl"


@dataclass(frozen=True)
class Constraints:
    """One prompt's constraints as the table lists them."""

    family: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class Table:
    """The constraint table, by prompt text (exact, and stripped as a fallback), where it came from, and the
    checkers built so far by prompt (built once: a prompt is graded many times over a run)."""

    path: Path
    exact: dict[str, Constraints]
    stripped: dict[str, Constraints]
    checkers: dict[str, tuple[Any, ...]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# The table


def table_path() -> Path:
    """constraints.jsonl in ``$RLHF_IF_DATA``, else in build/ beside this file."""
    folder = os.environ.get(DATA_ENV)
    return (Path(folder) if folder else Path(__file__).resolve().parent / "build") / TABLE_NAME


@functools.lru_cache(maxsize=4)
def _load_table(path: Path) -> Table:
    """The table at ``path``, read once per path."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no constraint table; write it with python instructions.py OUT_DIR and set {DATA_ENV}=OUT_DIR"
        )
    exact: dict[str, Constraints] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            kwargs = tuple(dict(kw or {}) for kw in row["kwargs"])
            exact[row["prompt"]] = Constraints(row.get("family", "ifeval"), tuple(row["instruction_id_list"]), kwargs)
    return Table(path, exact, {prompt.strip(): c for prompt, c in exact.items()})


def load_table() -> Table:
    """The constraint table for the current environment (cached)."""
    return _load_table(table_path())


def clear_cache() -> None:
    """Forget loaded tables and their built checkers (after a table or $RLHF_IF_DATA changes)."""
    _load_table.cache_clear()


def constraints_for(prompt: str) -> Constraints:
    """``prompt``'s constraints; ValueError naming the prompt and the table when the table lacks it."""
    table = load_table()
    found = table.exact.get(prompt) or table.stripped.get(prompt.strip())
    if found is None:
        raise ValueError(f"prompt {prompt[:80]!r} is not in the constraint table {table.path}")
    return found


def checkers_for(prompt: str) -> tuple[Constraints, tuple[Any, ...]]:
    """``prompt``'s constraints and their checkers (None where one cannot be built), built once per prompt."""
    constraints = constraints_for(prompt)
    checkers = load_table().checkers
    if prompt not in checkers:
        checkers[prompt] = tuple(
            _build(constraints.family, instruction_id, kwargs)
            for instruction_id, kwargs in zip(constraints.instruction_id_list, constraints.kwargs, strict=True)
        )
    return constraints, checkers[prompt]


# ---------------------------------------------------------------------------------------------------------------
# Checkers


@contextlib.contextmanager
def _offline_nltk() -> Iterator[None]:
    """nltk.download made a no-op for the duration: IFBench's utilities try to download nltk data on import, and
    the judge must never touch the network."""
    import nltk

    download = nltk.download
    nltk.download = lambda *args, **kwargs: False
    try:
        yield
    finally:
        nltk.download = download


@functools.cache
def registry(family: str) -> dict[str, type]:
    """The checker classes of ``family`` ('ifeval' or 'ifbench') by constraint id."""
    if family == "ifeval":
        import langdetect

        langdetect.DetectorFactory.seed = 0  # the case checkers' English test is random otherwise
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

        return INSTRUCTION_DICT
    if family == "ifbench":
        with _offline_nltk():
            from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT
        return INSTRUCTION_DICT
    raise ValueError(f"unknown constraint family {family!r}: expected 'ifeval' or 'ifbench'")


def _build(family: str, instruction_id: str, kwargs: dict[str, Any]) -> Any:
    """A checker set up with ``kwargs``, or None when it cannot be. Arguments a checker took as missing because
    they were falsy (IFBench's span start 0) are put back, so it checks what the prompt asked."""
    cls = registry(family).get(instruction_id)
    if cls is None:
        return None
    checker = cls(instruction_id)
    given = {k: v for k, v in kwargs.items() if v is not None}
    try:
        checker.build_description(**given)
        built = checker.get_instruction_args() or {}
    except Exception:
        return None
    for key, value in given.items():
        if key in built and built[key] != value and hasattr(checker, f"_{key}"):
            setattr(checker, f"_{key}", value)
    return checker


# ---------------------------------------------------------------------------------------------------------------
# Grading


def _follows(checker: Any, text: str) -> bool:
    """Whether ``text`` follows ``checker``'s constraint; a checker that fails or raises counts as not followed."""
    if checker is None or not text.strip():
        return False
    try:
        return bool(checker.check_following(text))
    except Exception:
        return False


def loose_variants(response: str) -> list[str]:
    """IFEval's loose variants of a response: as is, without its first line, last line or both, each also with
    markdown asterisks removed."""
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cut + [text.replace("*", "") for text in cut]


def _clean(response: str) -> str:
    """The response without a reasoning block (as if_verifiable grades): text after '</think>', none inside an
    unclosed '<think>'."""
    text = response.strip()
    if "</think>" in text:
        return text.split("</think>", 1)[-1].strip()
    return "" if text.startswith("<think>") else text


def check(prompt: str, response: str) -> dict[str, Any]:
    """``response`` graded against ``prompt``'s constraints: strict and loose fractions followed, and per
    constraint ``{"id", "strict", "loose"}``. An empty response follows nothing."""
    constraints, checkers = checkers_for(prompt)
    text = _clean(response if isinstance(response, str) else "")
    variants = loose_variants(text) if text else []
    results = []
    for instruction_id, checker in zip(constraints.instruction_id_list, checkers, strict=True):
        strict = _follows(checker, text)
        loose = strict or any(_follows(checker, v) for v in variants)
        results.append({"id": instruction_id, "strict": strict, "loose": loose})
    n = max(len(results), 1)
    return {
        "strict": sum(r["strict"] for r in results) / n,
        "loose": sum(r["loose"] for r in results) / n,
        "constraints": results,
    }


def breakdown(prompts: list[str], responses: list[str]) -> list[dict[str, Any]]:
    """Each response's strict and loose scores with every constraint's result (see ``check``)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [check(prompt, response) for prompt, response in zip(prompts, responses, strict=True)]


def score(prompts: list[str], responses: list[str]) -> list[float]:
    """The fraction of its prompt's constraints each response follows, strictly: the gold reward."""
    return [row["strict"] for row in breakdown(prompts, responses)]


def score_loose(prompts: list[str], responses: list[str]) -> list[float]:
    """The fraction of its prompt's constraints each response follows under IFEval's loose check."""
    return [row["loose"] for row in breakdown(prompts, responses)]
