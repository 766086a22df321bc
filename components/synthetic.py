"""A deterministic, learnable toy language for the demo: no downloads, runs anywhere.

The task is review polarity. The pre-training corpus shows which adjectives go together
("it was superb and moving"), but the labelled train split only ever uses a few of each
polarity's adjectives. Validation and test use all of them, so a model can only label the
unseen adjectives well if pre-training taught it that they behave like the seen ones: that is
how pre-training helps here.
"""

from __future__ import annotations

import random

POSITIVE = (
    "superb moving brilliant charming delightful gripping witty stunning tender joyful "
    "masterful vivid elegant inventive heartfelt radiant clever rousing sublime warm"
).split()
NEGATIVE = (
    "dull clumsy tedious bland lifeless shallow awkward dreary sloppy tiresome "
    "muddled hollow stale grating lazy flat soggy forced murky joyless"
).split()
NOUNS = (
    "film movie story script cast plot ending score drama comedy thriller sequel "
    "performance direction dialogue soundtrack pacing premise"
).split()
SUBJECTS = "i we critics audiences my friend the crowd".split()
INTENSIFIERS = "very really truly quite so rather deeply".split()
LABEL_NAMES = ("negative", "positive")
# Bump when the generated text changes: it is part of the data fingerprint (and so of cache keys).
VERSION = 2
SPLITS = ("corpus", "train", "validation", "test")
# The labelled train split sees only these first adjectives of each polarity.
SEEN_IN_TRAIN = 4

# Corpus sentences stack several adjectives of one polarity, so a masked adjective can only be
# predicted well by reading the polarity of the others: that is what pre-training has to learn.
_CORPUS_TEMPLATES = (
    "the {noun} was {a} and {b} .",
    "{a} , {b} and {c} : that was the {noun} .",
    "{subject} found the {noun} {int} {a} , {b} , even {c} .",
    "a {a} , {b} {noun} with a {c} {noun2} .",
    "{subject} thought it {int} {a} and {int2} {b} .",
)
_REVIEW_TEMPLATES = (
    "the {noun} was {a} .",
    "{subject} found the {noun} {int} {a} .",
    "a {a} {noun} , and a {b} {noun2} .",
    "{subject} thought the {noun} was {int} {a} .",
    "{int} {a} from start to finish .",
)


def generate(split: str, num_examples: int, seed: int = 0) -> list[dict]:
    """Rows of `{"text", "label"}` (label names) for a split; the corpus has labels too, unused.

    Raises:
        ValueError: for an unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; choose one of {', '.join(SPLITS)}")
    rng = random.Random(f"{seed}-{split}")
    templates = _CORPUS_TEMPLATES if split == "corpus" else _REVIEW_TEMPLATES
    vocab_limit = SEEN_IN_TRAIN if split == "train" else None
    return [_sentence(rng, templates, vocab_limit) for _ in range(num_examples)]


def _sentence(rng: random.Random, templates: tuple[str, ...], vocab_limit: int | None) -> dict:
    label = rng.randrange(2)
    words = (NEGATIVE, POSITIVE)[label][:vocab_limit]
    text = rng.choice(templates).format(
        noun=rng.choice(NOUNS),
        noun2=rng.choice(NOUNS),
        subject=rng.choice(SUBJECTS),
        int=rng.choice(INTENSIFIERS),
        int2=rng.choice(INTENSIFIERS),
        a=rng.choice(words),
        b=rng.choice(words),
        c=rng.choice(words),
    )
    return {"text": text, "label": LABEL_NAMES[label]}
