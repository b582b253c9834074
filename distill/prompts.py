"""Training prompts for distillation, none of them from Spec-Bench.

Three sources, each split deterministically into train and held-out prompts (the held-out ones
measure acceptance and are never trained on):
- GSM8K train questions (math word problems, as chat messages);
- HumanEval function stubs (code completion, as chat messages);
- instructions written here: task templates (essays, explanations, stories, e-mails, lists, role
  play, factual questions...) crossed with a list of everyday and academic topics.
A second stage (`context_prompts`) builds summarization, reading-comprehension, extraction,
rewriting and translation prompts around passages the target itself wrote, because Spec-Bench's
summarization, RAG and QA categories give the model a passage to work from. For the feature
drafter's wider corpus (`python -m distill.features`) three more: the same tasks over passages of
Python's own documentation (`documentation_prompts`: text any Python install has), translating the
target's translations back into English (`back_translation_prompts`), and a second turn after the
target's first answer (`follow_up_prompts`: multi-turn chat).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

TRAIN, HELD_OUT = "train", "held_out"


@dataclass(frozen=True)
class Prompt:
    key: str  # unique and stable: the corpus resumes by it
    source: str  # gsm8k, humaneval, instructions, context
    text: str  # the last user message
    split: str  # TRAIN or HELD_OUT
    history: tuple[tuple[str, str], ...] = ()  # earlier (role, content) turns of a multi-turn chat

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.history] + [{"role": "user", "content": self.text}]


TOPICS = (
    "photosynthesis", "the French Revolution", "black holes", "climate change", "the human immune system",
    "machine learning", "the Roman Empire", "volcanoes", "the stock market", "renewable energy",
    "the printing press", "honeybees", "the water cycle", "quantum computing", "the Great Wall of China",
    "vaccines", "the Internet", "chess", "coffee", "the Moon landing", "electric cars", "coral reefs",
    "the Renaissance", "sleep", "inflation", "dinosaurs", "the Olympic Games", "recycling", "DNA",
    "social media", "the Industrial Revolution", "earthquakes", "jazz music", "the Amazon rainforest",
    "antibiotics", "democracy", "the solar system", "meditation", "cryptocurrency", "the Cold War",
    "plate tectonics", "public libraries", "remote work", "the human brain", "tea ceremonies",
    "artificial satellites", "bread baking", "the Silk Road", "wind turbines", "Shakespeare's plays",
    "urban gardening", "the theory of evolution", "marathon running", "nuclear power", "ancient Egypt",
    "smartphones", "the ocean tides", "volunteering", "supply and demand", "the periodic table",
    "classical music", "deserts", "3D printing", "migratory birds", "the Magna Carta", "time management",
    "rainbows", "the history of money", "video games", "glaciers", "healthy eating", "robotics",
    "the Eiffel Tower", "friendship", "electricity", "the Mongol Empire", "bicycles", "viruses",
    "space telescopes", "learning a second language", "photography", "the Pacific Ocean",
    "public transportation", "mushrooms", "the Byzantine Empire", "cloud computing", "hurricanes",
    "the scientific method", "museums", "penguins", "solar panels", "the Nile River", "budgeting",
    "the immune response to allergies", "origami", "the history of aviation", "forests", "gravity",
    "the Cold War space race", "small businesses", "rivers and dams", "the human heart",
    "open-source software", "elephants", "the Aztec civilization", "air pollution", "board games",
)

INSTRUCTION_TEMPLATES = (
    "Write a short essay about {topic}.",
    "Explain {topic} to a high school student.",
    "What are the main advantages and disadvantages of {topic}?",
    "Give me five practical tips related to {topic}.",
    "Write a short story in which {topic} plays an important role.",
    "Write a persuasive email to a friend about why {topic} matters.",
    "Pretend you are a tour guide or teacher who knows everything about {topic}. Introduce it to a group of visitors.",
    "Write a short poem about {topic}.",
    "Answer briefly: what is the most important fact about {topic}?",
    "Summarize the history of {topic} in a few sentences.",
    "List three common misconceptions about {topic} and correct them.",
    "Compare {topic} with something similar and explain the differences.",
)

PASSAGE_TEMPLATE = "Write a detailed, factual paragraph about {topic}."

CONTEXT_TEMPLATES = (
    ("summary", "Summarize the following text in two sentences.\n\n{passage}"),
    ("reading", "Read the passage and answer the question.\n\nPassage: {passage}\n\nQuestion: What is the main idea of the passage?"),
    ("extraction", "Extract the key facts from this text as a bulleted list.\n\n{passage}"),
    ("rewrite", "Rewrite the following paragraph in simpler words.\n\n{passage}"),
    ("translation", "Translate the following text into French.\n\n{passage}"),
    ("question", "{passage}\n\nBased on the text above, write one question a student could answer from it, then answer it."),
)


def split_of(key: str, held_out_fraction: float) -> str:
    """TRAIN or HELD_OUT from a hash of the key: stable across runs and machines."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return HELD_OUT if bucket < held_out_fraction else TRAIN


def _read_jsonl(path: Path) -> list[dict]:
    with path.open() as lines:
        return [json.loads(line) for line in lines if line.strip()]


def base_prompts(data_dir: Path, held_out_fraction: float = 0.05, per_source: int = 0) -> list[Prompt]:
    """GSM8K, HumanEval and instruction prompts; `per_source` > 0 keeps that many of each source."""
    if "specbench" in str(data_dir).lower():
        raise ValueError("training prompts must not come from Spec-Bench")
    gsm8k = [(f"gsm8k/{i}", row["question"]) for i, row in enumerate(_read_jsonl(data_dir / "gsm8k_train.jsonl"))]
    humaneval = [
        (row["task_id"], f"Complete the following Python function.\n\n```python\n{row['prompt']}```")
        for row in _read_jsonl(data_dir / "humaneval.jsonl")
    ]
    instructions = [
        (f"instructions/{t}/{topic}", template.format(topic=topic)) for topic in TOPICS for t, template in enumerate(INSTRUCTION_TEMPLATES)
    ]
    prompts = []
    for source, items in (("gsm8k", gsm8k), ("humaneval", humaneval), ("instructions", instructions)):
        for key, text in items[: per_source or None]:
            prompts.append(Prompt(key, source, text, split_of(key, held_out_fraction)))
    return prompts


def passage_prompts(limit: int = 0) -> list[Prompt]:
    """Prompts whose answers become the passages of `context_prompts` (trained on as well)."""
    return [Prompt(f"passage/{topic}", "instructions", PASSAGE_TEMPLATE.format(topic=topic), TRAIN) for topic in TOPICS[: limit or None]]


def context_prompts(passages: dict[str, str], held_out_fraction: float = 0.05) -> list[Prompt]:
    """Tasks over passages: `passages` maps a passage prompt's key to the target's answer."""
    prompts = []
    for passage_key, passage in sorted(passages.items()):
        topic = passage_key.split("/", 1)[1]
        for name, template in CONTEXT_TEMPLATES:
            key = f"context/{name}/{topic}"
            prompts.append(Prompt(key, "context", template.format(passage=passage.strip()), split_of(key, held_out_fraction)))
    return prompts


DOCUMENTATION_TEMPLATES = (
    ("summary", "Summarize the following documentation in a few sentences.\n\n{passage}"),
    ("extraction", "List the functions, classes or options mentioned in this text and what each does.\n\n{passage}"),
    ("question", "Read the documentation below and answer: what problem does it solve, and how is it used?\n\n{passage}"),
    ("translation", "Translate the following text into German.\n\n{passage}"),
    ("explain", "Explain the following text to a beginner programmer.\n\n{passage}"),
)


def documentation_passages(limit: int = 0, min_chars: int = 400, max_chars: int = 1500) -> dict[str, str]:
    """Docstrings of Python's standard library (modules and their public classes), keyed by
    dotted name: real technical prose for summarizing, extracting and answering questions."""
    import importlib
    import inspect
    import sys

    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in {"antigravity", "this", "idlelib", "turtledemo"})
    passages = {}
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception:  # platform-specific or optional modules
            continue
        objects = [(name, module)] + [(f"{name}.{k}", v) for k, v in sorted(vars(module).items()) if inspect.isclass(v) and not k.startswith("_")]
        for key, obj in objects:
            doc = inspect.getdoc(obj) or ""
            if min_chars <= len(doc) <= max_chars and key not in passages and doc not in passages.values():
                passages[key] = doc
        if limit and len(passages) >= limit:
            break
    return dict(list(passages.items())[: limit or None])


def documentation_prompts(passages: dict[str, str], held_out_fraction: float = 0.05) -> list[Prompt]:
    """Two tasks per passage, the tasks taking turns over the passages."""
    prompts = []
    for index, (name, passage) in enumerate(sorted(passages.items())):
        for offset in (0, 2):
            task, template = DOCUMENTATION_TEMPLATES[(index + offset) % len(DOCUMENTATION_TEMPLATES)]
            key = f"docs/{task}/{name}"
            prompts.append(Prompt(key, "context", template.format(passage=passage), split_of(key, held_out_fraction)))
    return prompts


def back_translation_prompts(translations: dict[str, str], held_out_fraction: float = 0.05) -> list[Prompt]:
    """`translations` maps a translation prompt's key to the target's translation."""
    language = lambda key: "German" if key.startswith("docs/") else "French"  # noqa: E731 (see the templates)
    prompts = []
    for key, text in sorted(translations.items()):
        new_key = f"back/{key}"
        prompts.append(Prompt(new_key, "translation", f"Translate the following {language(key)} text into English.\n\n{text.strip()}", split_of(new_key, held_out_fraction)))
    return prompts


FOLLOW_UPS = (
    "Make your answer shorter.",
    "Can you explain that to a ten-year-old?",
    "Give your answer a title and a one-line summary.",
    "What would be a good follow-up question about this? Answer it too.",
    "Rewrite your answer as a numbered list.",
)


def follow_up_prompts(first_turns: list[tuple[Prompt, str]], held_out_fraction: float = 0.05) -> list[Prompt]:
    """A second user turn after each (first prompt, the target's answer)."""
    prompts = []
    for index, (first, answer) in enumerate(sorted(first_turns, key=lambda pair: pair[0].key)):
        key = f"chat/{first.key}"
        history = first.history + (("user", first.text), ("assistant", answer.strip()))
        prompts.append(Prompt(key, "chat", FOLLOW_UPS[index % len(FOLLOW_UPS)], split_of(key, held_out_fraction), history))
    return prompts
