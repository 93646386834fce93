"""The built-in corpus: generated text with enough structure for a tiny model to learn, so `tiny` needs no download.

Documents are short "village chronicles": 48 people with stable attributes (home town, trade, pet) recur across
documents, sentences follow a small grammar, and simple arithmetic facts are always right. A model can learn the grammar
quickly and the facts slowly, so the loss keeps falling for a while. A few documents carry HTML tags and some are exact
duplicates, so the cleaning and de-duplication stages have real work to do.

The labelled task asks for a person's home town. The facts are stated only in the unlabelled corpus, and the
validation set is about *other people* than the training set (split by person), so the labels alone cannot teach them:
a model from scratch can only guess, while a model that learned the corpus may know the answer. It measures the thing
pretraining is for.
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
CORPUS_VERSION = "v2"  # in the file names: a changed generator never reuses files an older one wrote
TOWNS = ["oakford", "rivermouth", "stonebridge", "millbrook", "ashvale", "highmoor", "eastwick", "fairhaven"]
TRADES = ["baker", "smith", "weaver", "farmer", "potter", "miller", "fisher", "carpenter", "healer", "scribe"]
PETS = ["cat", "dog", "goat", "parrot", "horse", "rabbit", "owl", "tortoise"]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "brown", "grey"]
THINGS = ["bread", "rope", "cloth", "pots", "flour", "fish", "chairs", "tea", "apples", "honey"]
WEATHER = ["rain", "sun", "snow", "wind", "fog"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def _people(rng: random.Random) -> dict[str, dict[str, str]]:
    # Stable facts: the same person always lives in the same town, has the same trade and pet.
    return {n: {"town": rng.choice(TOWNS), "trade": rng.choice(TRADES), "pet": rng.choice(PETS),
                "color": rng.choice(COLORS)} for n in NAMES}


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
                s = f"on a day of {rng.choice(WEATHER)}, {name} the {p['trade']} sold {NUMBER_WORDS[a]} {rng.choice(THINGS)} to {other}."
            elif kind == 3:
                s = f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}, said {name}."
            elif kind == 4:
                s = f"{name} walked from {p['town']} to {people[other]['town']} to visit {other}."
            elif kind == 5:
                s = f"the {p['pet']} of {name} is {p['color']}, and the {people[other]['pet']} of {other} is {people[other]['color']}."
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


HOME_TOWN_PROMPTS = ["{name} lives in", "everyone knows where {name} lives: {name} lives in",
                     "{name} the {trade} lives in", "the {pet} of {name} lives with {name} in"]


def generate_labelled(num_examples: int, task: str, seed: int = 0) -> list[dict]:
    """The built-in labelled task over the same world as the corpus; each example names its `person`, by which
    `finetune` splits train from validation.

    classification: a sentence that stops where a person's home town would follow -> the town (8 classes).
    sft: a question about a person -> the answer sentence (the facts are the corpus's facts).
    """
    rng = random.Random(seed + 1)
    people = _people(random.Random(1234))
    examples = []
    for _ in range(num_examples):
        name = rng.choice(NAMES)
        p = people[name]
        if task == "sft":
            if rng.random() < 0.5:
                examples.append({"prompt": f"where does {name} live?", "response": f"{name} lives in {p['town']}.",
                                 "person": name})
            else:
                examples.append({"prompt": f"what pet does {name} have?",
                                 "response": f"{name} has a {p['color']} {p['pet']}.", "person": name})
            continue
        text = rng.choice(HOME_TOWN_PROMPTS).format(name=name, trade=p["trade"], pet=p["pet"])
        examples.append({"text": text, "label": p["town"], "person": name})
    return examples
