"""The built-in corpus: generated text with enough structure for a tiny model to learn, so `tiny` needs no download.

Documents are short "village chronicles" about a made-up world: 48 people with stable attributes (home town, trade,
pet) recur across documents, sentences follow a small grammar, and simple arithmetic facts are always right. A few
documents carry HTML tags and some are exact duplicates, so the cleaning and de-duplication stages have real work to do.

Every town, trade, animal, colour and kind of goods is a made-up word (16 of each, from one syllable generator), so
nothing but its use in the corpus tells what kind of thing a word names.

The labelled tasks ask what only the unlabelled corpus teaches, and hold out whole groups, so labels alone cannot:
- classification: what kind of thing a word names (town, trade, animal, colour, goods). The validation words never
  occur in the training examples (the split is by word): a model from scratch can only guess, while a model that
  learned the corpus has seen each word used like the others of its kind. Language models pick this up early.
- sft: a person's home town or pet, split by person. The facts themselves are learned late: a 2-layer model of width
  64 knows few of them after 300 steps.
"""

from __future__ import annotations

import os
import random


def _names(count: int, seed: int = 99) -> list[str]:
    """Made-up two- and three-syllable names (several BPE pieces each, so knowing a person is a real skill)."""
    rng = random.Random(seed)
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.choice([2, 3])))
        if name not in names:
            names.append(name)
    return names


NAMES = _names(48)
CORPUS_VERSION = "v3"  # in the file names: a changed generator never reuses files an older one wrote
_WORDS = [w for w in _names(200, seed=7) if w not in NAMES][:80]
TOWNS, TRADES, PETS, COLORS, THINGS = (_WORDS[i * 16:(i + 1) * 16] for i in range(5))
CATEGORIES = {"town": TOWNS, "trade": TRADES, "animal": PETS, "colour": COLORS, "goods": THINGS}
"""The classification task's labels and their words."""
WEATHER = ["rain", "sun", "snow", "wind", "fog"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def _people(rng: random.Random) -> dict[str, dict[str, str]]:
    """Stable facts: the same person always lives in the same town, has the same trade and pet. Each word is given to
    the same number of people (48 / 16 = 3), so every word of the world occurs in the corpus."""
    def dealt(words: list[str]) -> list[str]:
        order = [words[i % len(words)] for i in range(len(NAMES))]
        rng.shuffle(order)
        return order
    towns, trades, pets, colors = dealt(TOWNS), dealt(TRADES), dealt(PETS), dealt(COLORS)
    return {n: {"town": towns[i], "trade": trades[i], "pet": pets[i], "color": colors[i]} for i, n in enumerate(NAMES)}


def generate_documents(num_docs: int, seed: int = 0) -> list[str]:
    """Return `num_docs` generated documents (deterministic for a seed)."""
    rng = random.Random(seed)
    people = _people(random.Random(1234))  # facts are fixed across seeds, so every corpus teaches the same world
    docs = []
    for i in range(num_docs):
        if i > 10 and rng.random() < 0.02:
            docs.append(docs[rng.randrange(len(docs))])  # exact duplicate for the dedup stage
            continue
        sentences = []
        for _ in range(rng.randint(3, 8)):
            name = rng.choice(NAMES)
            p = people[name]
            other = rng.choice(NAMES)
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            kind = rng.randrange(9)
            if kind in (0, 7, 8):  # where people live is the most common statement: the fact the task asks for
                s = f"{name} lives in {p['town']} and works as a {p['trade']}."
            elif kind == 1:
                s = f"{name} has a {p['color']} {p['pet']} that follows {name} everywhere."
            elif kind == 2:
                s = (f"on a day of {rng.choice(WEATHER)}, {name} the {p['trade']} sold {NUMBER_WORDS[a]} "
                     f"{rng.choice(THINGS)} to {other}.")
            elif kind == 3:
                s = f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}, said {name}."
            elif kind == 4:
                s = f"{name} walked from {p['town']} to {people[other]['town']} to visit {other}."
            elif kind == 5:
                s = (f"the {p['pet']} of {name} is {p['color']}, and the {people[other]['pet']} of {other} is "
                     f"{people[other]['color']}.")
            else:
                s = f"in {p['town']} everyone knows that {name} is the best {p['trade']}."
            sentences.append(s)
        doc = " ".join(sentences)
        if rng.random() < 0.05:
            doc = f"<p>{doc}</p> <br/>"  # markup for the HTML-stripping stage
        docs.append(doc)
    return docs


def write_builtin_corpus(out_dir: str, num_docs: int, seed: int = 0, num_files: int = 4) -> list[str]:
    """Write the built-in corpus as `num_files` .txt shards (one document per line); returns their paths.

    Files are written once and reused: a second call with the same arguments returns the existing files.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"builtin-{CORPUS_VERSION}-{seed}-{num_docs}-{i:02d}.txt") for i in range(num_files)]
    if all(os.path.exists(p) for p in paths):
        return paths
    docs = generate_documents(num_docs, seed)
    for i, path in enumerate(paths):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(docs[i::num_files]) + "\n")
        os.replace(tmp, path)
    return paths


WORD_PROMPTS = ["{word}", "we spoke of {word}", "the word was {word}", "she wrote down {word}"]
"""Frames that never occur in the corpus, the word last (what last-token pooling reads)."""


def generate_labelled(num_examples: int, task: str, seed: int = 0) -> list[dict]:
    """The built-in labelled task over the same world as the corpus. Each example names its `group` (a word, or a
    person for sft and chat), by which `finetune` splits train from validation.

    classification: a word in a neutral frame -> what kind of thing it names (5 classes, balanced).
    sft: a question about a person -> the answer sentence (the facts are the corpus's facts).
    chat: the same questions and answers as one- or two-turn conversations.
    """
    rng = random.Random(seed + 1)
    people = _people(random.Random(1234))
    examples = []
    for _ in range(num_examples):
        if task == "chat":  # one or two turns about a person
            name = rng.choice(NAMES)
            p = people[name]
            turns = [(f"where does {name} live?", f"{name} lives in {p['town']}."),
                     (f"what pet does {name} have?", f"{name} has a {p['color']} {p['pet']}.")]
            rng.shuffle(turns)
            messages = []
            for question, answer in turns[: rng.choice((1, 2))]:
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            examples.append({"messages": messages, "group": name})
            continue
        if task == "sft":
            name = rng.choice(NAMES)
            p = people[name]
            if rng.random() < 0.5:
                examples.append({"prompt": f"where does {name} live?", "response": f"{name} lives in {p['town']}.",
                                 "group": name})
            else:
                examples.append({"prompt": f"what pet does {name} have?",
                                 "response": f"{name} has a {p['color']} {p['pet']}.", "group": name})
            continue
        category = rng.choice(list(CATEGORIES))
        word = rng.choice(CATEGORIES[category])
        examples.append({"text": rng.choice(WORD_PROMPTS).format(word=word), "label": category, "group": word})
    return examples
