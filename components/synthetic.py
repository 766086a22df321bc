"""A deterministic, learnable toy language for the demo: no downloads, runs anywhere.

The task is review polarity. The pre-training corpus shows which adjectives go together
("it was superb and moving"), but the labelled train split only ever uses a few of each
polarity's adjectives. Validation and test use all of them, so a model can only label the
unseen adjectives well if pre-training taught it that they behave like the seen ones: that is
how pre-training helps here.

A second task on the same reviews, `topic`, labels them by what they talk about (story, music,
acting, craft); a third, `entities`, tags words (token classification): the reviewer's name as PER
and each adjective as POS or NEG by its polarity, with train again seeing only a few adjectives.
One pre-training, several fine-tuned tasks (configs/demo_multitask.yaml).
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
# Adverbs that only ever modify one polarity, and only in the corpus: predicting a masked adverb
# from the adjective next to it (or the reverse) is a local pattern a small model learns quickly,
# and it puts the adjectives' polarity into their representations.
POSITIVE_MARKERS = "wonderfully gloriously beautifully".split()
NEGATIVE_MARKERS = "painfully dreadfully awfully".split()
SUBJECTS = "i we critics audiences my friend the crowd".split()
# The second task, `topic`: what part of a film a review talks about, told by its nouns.
TOPICS = {
    "story": "story script plot ending premise dialogue".split(),
    "music": "score soundtrack".split(),
    "acting": "cast performance".split(),
    "craft": "direction pacing".split(),
}
TASKS = ("sentiment", "topic", "entities", "answers")
# The `entities` task's reviewers: a first name, sometimes with a family name (a two-word entity).
FIRST_NAMES = "anna ben clara david elena felix greta hugo ines jonas".split()
FAMILY_NAMES = "berg costa diaz evans fischer garcia".split()
INTENSIFIERS = "very really truly quite so rather deeply".split()
LABEL_NAMES = ("negative", "positive")
# Bump when the generated text changes: it is part of the data fingerprint (and so of cache keys).
VERSION = 3
SPLITS = ("corpus", "train", "validation", "test")
# The labelled train split sees only these first adjectives of each polarity.
SEEN_IN_TRAIN = 4

# Corpus sentences pair each adjective with a polarity-marked adverb and stack adjectives of one
# polarity, so a masked adjective is best predicted from the polarity of its context.
_CORPUS_TEMPLATES = (
    "the {noun} was {m} {a} and {b} .",
    "{a} , {b} and {m} {c} : that was the {noun} .",
    "{subject} found the {noun} {m} {a} , even {m2} {b} .",
    "a {m} {a} {noun} with a {c} {noun2} .",
    "{subject} thought it {int} {a} and {m} {b} .",
)
_REVIEW_TEMPLATES = (
    "the {noun} was {a} .",
    "{subject} found the {noun} {int} {a} .",
    "a {a} {noun} , and a {b} {noun2} .",
    "{subject} thought the {noun} was {int} {a} .",
    "{int} {a} from start to finish .",
)


def generate(split: str, num_examples: int, seed: int = 0, task: str = "sentiment") -> list[dict]:
    """Rows of `{"text", "label"}` (label names) for a split; the corpus has labels too, unused.
    `task`: label the reviews by polarity (`sentiment`) or by what they talk about (`topic`).

    Raises:
        ValueError: for an unknown split or task.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; choose one of {', '.join(SPLITS)}")
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "topic":
        rng = random.Random(f"{seed}-{split}-topic")
        return [_topic_sentence(rng) for _ in range(num_examples)]
    if task == "entities":
        rng = random.Random(f"{seed}-{split}-entities")
        return [_entity_sentence(rng, SEEN_IN_TRAIN if split == "train" else None) for _ in range(num_examples)]
    if task == "answers":
        rng = random.Random(f"{seed}-{split}-answers")
        return [_question(rng, SEEN_IN_TRAIN if split == "train" else None) for _ in range(num_examples)]
    rng = random.Random(f"{seed}-{split}")
    templates = _CORPUS_TEMPLATES if split == "corpus" else _REVIEW_TEMPLATES
    vocab_limit = SEEN_IN_TRAIN if split == "train" else None
    return [_sentence(rng, templates, vocab_limit) for _ in range(num_examples)]


def _topic_sentence(rng: random.Random) -> dict:
    """A review whose nouns all come from one topic; its polarity is noise for this task."""
    topic = rng.choice(sorted(TOPICS))
    words = rng.choice((NEGATIVE, POSITIVE))
    text = rng.choice([template for template in _REVIEW_TEMPLATES if "{noun}" in template]).format(
        noun=rng.choice(TOPICS[topic]),
        noun2=rng.choice(TOPICS[topic]),
        subject=rng.choice(SUBJECTS),
        int=rng.choice(INTENSIFIERS),
        a=rng.choice(words),
        b=rng.choice(words),
    )
    return {"text": text, "label": topic}


_ENTITY_TEMPLATES = (
    "{person} found the {noun} {int} {a} .",
    "{person} thought the {noun} was {a} and {b} .",
    "the {noun} was {a} , said {person} .",
    "a {a} {noun} , and a {b} {noun2} , wrote {person} .",
)


def _entity_sentence(rng: random.Random, vocab_limit: int | None) -> dict:
    """Words and their IOB2 tags: the reviewer (PER) and each adjective (POS or NEG)."""
    person = [rng.choice(FIRST_NAMES)] + ([rng.choice(FAMILY_NAMES)] if rng.random() < 0.5 else [])
    polarity = rng.randrange(2)
    words, tags = [], []
    for slot in rng.choice(_ENTITY_TEMPLATES).split():
        if slot == "{person}":
            words += person
            tags += ["B-PER"] + ["I-PER"] * (len(person) - 1)
        elif slot in ("{a}", "{b}"):
            words.append(rng.choice((NEGATIVE, POSITIVE)[polarity][:vocab_limit]))
            tags.append(("B-NEG", "B-POS")[polarity])
        else:
            choices = {"{noun}": NOUNS, "{noun2}": NOUNS, "{int}": INTENSIFIERS}
            words.append(rng.choice(choices[slot]) if slot in choices else slot)
            tags.append("O")
    return {"text": words, "label": tags}


QUESTIONS = {"PER": "who wrote this review ?", "POLARITY": "what did the reviewer call it ?"}


def _question(rng: random.Random, vocab_limit: int | None) -> dict:
    """A review (an entities sentence), a question about it, and the answer's span: the reviewer's
    name, or the first adjective (SQuAD's columns: `text` is the context, `label` the answers)."""
    review = _entity_sentence(rng, vocab_limit)
    asks = rng.choice(sorted(QUESTIONS))
    wanted = [i for i, tag in enumerate(review["label"]) if tag.endswith("PER" if asks == "PER" else ("POS", "NEG"))]
    first, last = wanted[0], wanted[-1] if asks == "PER" else wanted[0]
    start = sum(len(word) + 1 for word in review["text"][:first])
    answer = " ".join(review["text"][first : last + 1])
    context = " ".join(review["text"])
    return {"text": context, "question": QUESTIONS[asks], "label": {"text": [answer], "answer_start": [start]}}


def _sentence(rng: random.Random, templates: tuple[str, ...], vocab_limit: int | None) -> dict:
    label = rng.randrange(2)
    words = (NEGATIVE, POSITIVE)[label][:vocab_limit]
    markers = (NEGATIVE_MARKERS, POSITIVE_MARKERS)[label]
    text = rng.choice(templates).format(
        noun=rng.choice(NOUNS),
        noun2=rng.choice(NOUNS),
        subject=rng.choice(SUBJECTS),
        int=rng.choice(INTENSIFIERS),
        int2=rng.choice(INTENSIFIERS),
        a=rng.choice(words),
        b=rng.choice(words),
        c=rng.choice(words),
        m=rng.choice(markers),
        m2=rng.choice(markers),
    )
    return {"text": text, "label": LABEL_NAMES[label]}
