"""The built-in toy world: prompts, a programmatic gold reward, mixed-quality demonstrations,
a word-level tokenizer and a tiny Llama, all generated locally and deterministically from a seed.

A prompt reads like ``"describe thoroughly volcano to a child :"``; a response is a bag of words
drawn from a closed vocabulary. The gold reward trades several attributes off against each other
(on-topic words, politeness with diminishing returns, rudeness, off-topic words, repetition and a
length that suits the instruction), so no single trick maximizes it. Only labelers and evaluation
ever see it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

TOPICS: dict[str, tuple[str, ...]] = {
    "ocean": ("water", "waves", "salt", "tide", "coral", "fish", "shore", "deep"),
    "forest": ("trees", "leaves", "moss", "roots", "birds", "shade", "pine", "trail"),
    "volcano": ("lava", "magma", "ash", "crater", "eruption", "heat", "rock", "smoke"),
    "space": ("stars", "planets", "orbit", "rocket", "galaxy", "moon", "comet", "vacuum"),
    "music": ("melody", "rhythm", "notes", "guitar", "drums", "song", "chords", "tempo"),
    "cooking": ("recipe", "oven", "spices", "flavor", "knife", "boil", "dough", "sauce"),
    "garden": ("soil", "seeds", "flowers", "compost", "weeds", "bloom", "hose", "sprout"),
    "computers": ("code", "memory", "processor", "software", "keyboard", "data", "chip", "network"),
    "weather": ("rain", "clouds", "wind", "storm", "sunny", "forecast", "thunder", "humid"),
    "history": ("ancient", "empire", "war", "kings", "dates", "museum", "records", "century"),
    "sports": ("team", "goal", "ball", "score", "coach", "match", "league", "athlete"),
    "medicine": ("doctor", "health", "cure", "vaccine", "nurse", "pills", "symptoms", "clinic"),
    "art": ("paint", "canvas", "brush", "sculpture", "colors", "gallery", "sketch", "portrait"),
    "travel": ("passport", "flight", "luggage", "hotel", "map", "journey", "tourist", "border"),
    "finance": ("money", "budget", "savings", "interest", "loan", "invest", "stocks", "bank"),
    "physics": ("energy", "mass", "force", "gravity", "atoms", "light", "motion", "quantum"),
    "chemistry": ("molecules", "acid", "reaction", "bonds", "element", "lab", "solution", "catalyst"),
    "animals": ("mammals", "fur", "habitat", "predator", "herd", "species", "wild", "paws"),
    "mountains": ("peak", "summit", "climb", "snow", "altitude", "ridge", "cliff", "valley"),
    "cities": ("streets", "traffic", "buildings", "subway", "crowds", "parks", "downtown", "skyline"),
    "education": ("school", "teacher", "lessons", "students", "exams", "homework", "library", "study"),
    "photography": ("camera", "lens", "shutter", "focus", "exposure", "photo", "flash", "zoom"),
    "farming": ("crops", "harvest", "tractor", "barn", "cattle", "wheat", "field", "irrigation"),
    "architecture": ("design", "bridge", "arch", "tower", "concrete", "blueprint", "facade", "column"),
}
# Instruction phrasing -> the response length (in words) that suits it.
STYLES: dict[str, int] = {
    "explain briefly": 5,
    "in a few words describe": 5,
    "tell me about": 9,
    "what do you know about": 9,
    "describe": 13,
    "write a paragraph about": 13,
    "describe thoroughly": 18,
    "give a detailed account of": 18,
}
AUDIENCES: tuple[str, ...] = ("", "to a child", "to an expert", "to a friend")
POLITE: tuple[str, ...] = ("sure", "glad", "happy", "gladly", "thanks", "certainly")
RUDE: tuple[str, ...] = ("whatever", "boring", "stupid", "ugh", "meh")
FILLER: tuple[str, ...] = ("the", "a", "and", "is", "of", "with", "has", "very", "it", "many", ",", ".")
PROMPT_END = ":"
SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": "<pad>",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "unk_token": "<unk>",
}

_TOPIC_OF_WORD = {word: topic for topic, words in TOPICS.items() for word in words}


class GoldRewardConfig(BaseModel):
    """Weights of the gold reward's attributes."""

    model_config = ConfigDict(extra="forbid")
    on_topic: float = Field(1.0, description="Reward per distinct on-topic content word.")
    polite: float = Field(3.0, description="Total politeness reward approached with diminishing returns.")
    rude: float = Field(-3.0, description="Reward per rude word (negative).")
    off_topic: float = Field(-1.0, description="Reward per content word of another topic (negative).")
    repetition: float = Field(-0.75, description="Reward per repeated non-filler word (negative).")
    length: float = Field(-1.0, description="Reward per word beyond the length tolerance (negative).")
    length_tolerance: int = Field(2, ge=0, description="Words of slack around the instruction's ideal length.")


@dataclass(frozen=True)
class Prompt:
    text: str
    topic: str
    target_length: int


def parse_prompt(text: str) -> Prompt:
    """Recover topic and ideal length from a toy-world prompt; ValueError names what is missing."""
    words = text.split()
    topic = next((w for w in words if w in TOPICS), None)
    style = next((s for s in STYLES if text.startswith(s + " ")), None)
    if topic is None or style is None:
        raise ValueError(f"not a toy-world prompt (no known topic or instruction style): {text!r}")
    return Prompt(text, topic, STYLES[style])


def gold_components(prompt: str, response: str, config: GoldRewardConfig | None = None) -> dict[str, float]:
    """The gold reward attribute by attribute (they sum to :func:`gold_reward`), to show what a policy changed."""
    cfg = config or GoldRewardConfig()
    meta = parse_prompt(prompt)
    words = response.split()
    seen: set[str] = set()
    counts = dict.fromkeys(("on_topic", "off_topic", "rude", "repetition"), 0)
    n_polite = 0
    for word in words:
        repeated = word in seen and word not in FILLER
        seen.add(word)
        if repeated:
            counts["repetition"] += 1
        elif word in POLITE:
            n_polite += 1
        elif _TOPIC_OF_WORD.get(word) == meta.topic:
            counts["on_topic"] += 1
        elif word in _TOPIC_OF_WORD:
            counts["off_topic"] += 1
        if word in RUDE:
            counts["rude"] += 1
    excess = max(0, abs(len(words) - meta.target_length) - cfg.length_tolerance)
    return {
        **{name: getattr(cfg, name) * n for name, n in counts.items()},
        "polite": cfg.polite * (1.0 - 0.5**n_polite),
        "length": cfg.length * excess,
    }


def gold_reward(prompt: str, response: str, config: GoldRewardConfig | None = None) -> float:
    """The hidden ground truth that simulated labelers and evaluation judge with."""
    return sum(gold_components(prompt, response, config).values())


def gold_rewards(prompts: list[str], responses: list[str]) -> list[float]:
    """Batched :func:`gold_reward`, the signature evaluation and labelers take."""
    return [gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)]


class WorldConfig(BaseModel):
    """How the toy world is generated."""

    model_config = ConfigDict(extra="forbid")
    n_demonstrations: int = Field(8000, ge=1, description="Number of (prompt, response) SFT demonstrations.")
    n_eval_prompts: int = Field(256, ge=1, description="Held-out prompts for evaluation (never trained on).")
    n_preference_prompts: int = Field(128, ge=1, description="Prompts reserved for preference collection.")
    n_ppo_prompts: int = Field(128, ge=1, description="Prompts reserved for PPO rollouts.")
    hidden_size: int = Field(128, ge=8, description="Width of the tiny Llama.")
    num_layers: int = Field(4, ge=1, description="Transformer blocks of the tiny Llama.")
    num_heads: int = Field(4, ge=1, description="Attention heads of the tiny Llama.")
    max_position_embeddings: int = Field(64, ge=16, description="Longest prompt+response the tiny Llama takes.")


@dataclass
class World:
    sft_prompts: list[str]
    preference_prompts: list[str]
    ppo_prompts: list[str]
    eval_prompts: list[str]
    demonstrations: list[tuple[str, str]]


def all_prompts() -> list[str]:
    """Every prompt the world can ask, in a fixed order."""
    prompts = []
    for style in STYLES:
        for topic in TOPICS:
            for audience in AUDIENCES:
                prompts.append(" ".join(filter(None, (style, topic, audience, PROMPT_END))))
    return prompts


def demonstration(prompt: str, quality: float, rng: random.Random) -> str:
    """A labeler-written response whose flaws (wrong length, rudeness, off-topic words,
    repetition, filler) grow as ``quality`` in [0, 1] falls."""
    meta = parse_prompt(prompt)
    flaw = 1.0 - quality
    length = max(1, round(rng.gauss(meta.target_length, 0.5 + 6.0 * flaw)))
    on_topic = list(TOPICS[meta.topic])
    rng.shuffle(on_topic)
    other_topics = [t for t in TOPICS if t != meta.topic]
    words: list[str] = [rng.choice(POLITE)] if rng.random() < 0.5 else []
    while len(words) < length:
        u = rng.random()
        if u < 0.12 * flaw:
            words.append(rng.choice(RUDE))
        elif u < 0.35 * flaw:
            words.append(rng.choice(TOPICS[rng.choice(other_topics)]))
        elif u < 0.50 * flaw and words:
            words.append(rng.choice(words))
        elif on_topic and rng.random() < 0.45 + 0.4 * quality:
            words.append(on_topic.pop())
        elif rng.random() < 0.1:
            words.append(rng.choice(POLITE))
        else:
            words.append(rng.choice(FILLER))
    return " ".join(words[:length])


def make_world(seed: int, config: WorldConfig | None = None) -> World:
    """Split the prompts four ways and write mixed-quality demonstrations for the SFT split."""
    cfg = config or WorldConfig()
    rng = random.Random(seed)
    prompts = all_prompts()
    rng.shuffle(prompts)
    n_held = cfg.n_eval_prompts + cfg.n_preference_prompts + cfg.n_ppo_prompts
    if n_held >= len(prompts):
        raise ValueError(
            f"world: n_eval_prompts + n_preference_prompts + n_ppo_prompts = {n_held} leaves no SFT prompts "
            f"(the toy world has {len(prompts)})"
        )
    eval_prompts, prompts = prompts[: cfg.n_eval_prompts], prompts[cfg.n_eval_prompts :]
    pref_prompts, prompts = prompts[: cfg.n_preference_prompts], prompts[cfg.n_preference_prompts :]
    ppo_prompts, sft_prompts = prompts[: cfg.n_ppo_prompts], prompts[cfg.n_ppo_prompts :]
    demos = []
    for _ in range(cfg.n_demonstrations):
        prompt = rng.choice(sft_prompts)
        demos.append((prompt, demonstration(prompt, rng.random(), rng)))
    return World(sft_prompts, pref_prompts, ppo_prompts, eval_prompts, demos)


def vocabulary() -> list[str]:
    """Every word of the world, specials first, in a fixed order."""
    words = list(SPECIAL_TOKENS.values())
    for style in STYLES:
        words += style.split()
    for audience in AUDIENCES:
        words += audience.split()
    words += [PROMPT_END, *TOPICS, *_TOPIC_OF_WORD, *POLITE, *RUDE, *FILLER]
    return list(dict.fromkeys(words))


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` that prepends <bos>, with pad/eos/unk tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = SPECIAL_TOKENS["bos_token"]
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)


def build_model(tokenizer, config: WorldConfig | None = None, seed: int = 0):
    """A freshly initialized tiny ``LlamaForCausalLM`` (about 0.9M parameters at the defaults)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = config or WorldConfig()
    torch.manual_seed(seed)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=3 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(model_config)
