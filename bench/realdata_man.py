"""A second real-text benchmark, from the manual pages this machine has: which manual section a page belongs to.

    python bench/realdata_man.py /tmp/realdata-man    # ~1 min; needs nothing but /usr/share/man

The labelled task: a page's one-line summary (its NAME line) and the start of its DESCRIPTION -> its section, one of
four: 1 (user commands), 2/3 (programming interfaces: system calls, C and Perl library), 5/7 (file formats,
conventions and overviews), 8 (administration). Four classes with different sizes, capped so the majority class is
about a third, and at most a dozen pages of any one tool family (see `family`). The unlabelled corpus: the full
text of other pages (at most 60 of a family; SYNOPSIS to the end), so pretraining sees how each kind of page is
written, never the labelled pages themselves (nor another copy of one). A page's own name is removed from its labelled
text, and `see foo(1)` references lose their section numbers, which would give the label away.

Writes the same layout as bench/realdata.py: OUT_DIR/corpus/manpages.txt (one page per line), OUT_DIR/labelled/
{train,val}.jsonl ({"text", "label"}) and OUT_DIR/summary.json. Deterministic for a seed and the same pages.
"""

import collections
import glob
import gzip
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from realdata import write_task  # noqa: E402

MAN_DIR = "/usr/share/man"
LABELS = {"1": "1", "2": "2/3", "3": "2/3", "5": "5/7", "7": "5/7", "8": "8"}
TEXT_MACROS = re.compile(r"^\.(B|I|BI|BR|IB|IR|RB|RI|SM|SB)\s+(.*)$")
BREAK_MACROS = re.compile(r"^\.(PP|P|LP|TP|IP|HP|sp|br|SS|RS|RE|Sp|Vb|Ve|nf|fi|TQ|EX|EE)\b")


def troff_to_text(source: str) -> dict[str, str]:
    """A man page's troff source -> {section heading: plain text}; paragraphs are separated by newlines."""
    sections: dict[str, list[str]] = {}
    current = None
    for raw in source.splitlines():
        line = raw.rstrip()
        if line.startswith((".\\\"", "'\\\"", "\\\"")):
            continue
        heading = re.match(r'^\.SH\s+"?([^"]*)"?', line)
        if heading:
            current = heading.group(1).strip().upper()
            sections.setdefault(current, [])
            continue
        if current is None:
            continue
        text_macro = TEXT_MACROS.match(line)
        if text_macro:
            line = " ".join(part.strip('"') for part in re.findall(r'"[^"]*"|\S+', text_macro.group(2)))
        elif BREAK_MACROS.match(line):
            sections[current].append("\n")
            continue
        elif line.startswith((".", "'")):
            continue
        sections[current].append(unescape(line))
    return {name: re.sub(r"[ \t]+", " ", " ".join(parts)).replace(" \n ", "\n").strip()
            for name, parts in sections.items()}


def unescape(line: str) -> str:
    line = re.sub(r"\\f(\(..|\[[^]]*\]|.)", "", line)  # font changes
    line = re.sub(r"\\s[+-]?\d", "", line)  # size changes
    line = re.sub(r"\\\*(\(..|\[[^]]*\]|.)", "", line)  # strings
    line = re.sub(r"\\\((em|en)", "-", line)
    line = re.sub(r"\\\((lq|rq|dq)", '"', line)
    line = re.sub(r"\\\((aq|oq|cq)", "'", line)
    line = re.sub(r"\\\(..", "", line)  # other special characters
    line = re.sub(r"\\\[[^]]*\]", "", line)
    line = line.replace("\\-", "-").replace("\\e", "\\").replace("\\&", "").replace("\\ ", " ").replace("\\|", "")
    line = re.sub(r"\\[a-zA-Z0-9^%:/,]", "", line)
    return line


def pages() -> list[tuple[str, str, dict[str, str]]]:
    """(name, section digit, text by heading) of every page in MAN_DIR/man{1,2,3,5,7,8} that is not a .so link."""
    found, files = [], set()
    for path in sorted(glob.glob(f"{MAN_DIR}/man[123578]/*")):
        base = os.path.basename(path).removesuffix(".gz")
        name, _, section = base.rpartition(".")
        real = os.path.realpath(path)
        if not name or section[:1] not in LABELS or real in files:
            continue  # not a page of these sections, or a symlink to a page already read
        files.add(real)
        raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
        source = raw.decode("utf-8", "replace")
        if source.lstrip().startswith(".so "):
            continue  # a link to another page
        found.append((name, section[:1], troff_to_text(source)))
    return found


def labelled_text(name: str, sections: dict[str, str], max_chars: int = 700) -> str:
    """NAME's summary (without the page's own names) and the start of DESCRIPTION, without section numbers."""
    summary = sections.get("NAME", "")
    names, _, summary = summary.partition(" - ")
    description = sections.get("DESCRIPTION", "")
    text = f"{summary.strip()} {description}"[:max_chars]
    text = re.sub(r"\((\d)[a-z]*\)", "", text)  # see ls(1) -> see ls
    own = {n.strip() for n in re.split(r"[,\s]+", names) if n.strip()} | {name}
    for n in sorted(own, key=len, reverse=True):
        text = re.sub(rf"(?<![\w:-]){re.escape(n)}(?![\w:-])", "", text)
    return " ".join(text.split())


def family(name: str) -> str:
    """Pages of one tool family share a prefix (gcloud-compute-..., git-..., Algorithm::...): they are capped, so that
    neither the task nor the corpus is mostly one family's (this machine has thousands of gcloud pages)."""
    return re.split(r"[-_.:]", name.lower())[0]


def assemble(out_dir: str, *, seed: int = 0, per_class: int = 500, num_val: int = 600, per_family: int = 12,
             corpus_per_family: int = 60, max_page_chars: int = 8000, max_corpus_chars: int = 6_000_000) -> dict:
    rng = random.Random(seed)
    all_pages = pages()
    order = list(range(len(all_pages)))
    rng.shuffle(order)
    # At most `per_family` pages of a family are labelled, at most `corpus_per_family` go to the corpus.
    candidates, rest, per = [], [], collections.Counter()
    for index in order:
        per[family(all_pages[index][0])] += 1
        count = per[family(all_pages[index][0])]
        (candidates if count <= per_family else rest if count <= per_family + corpus_per_family else []).append(index)
    by_label = collections.defaultdict(list)
    for index in candidates:
        name, section, sections = all_pages[index]
        text = labelled_text(name, sections)
        if len(text) >= 80:
            by_label[LABELS[section]].append((index, text))
    examples, labelled, seen = [], set(), set()
    for label in sorted(by_label):
        for index, text in by_label[label][:per_class]:
            if text not in seen:
                examples.append({"text": text, "label": label})
                labelled.add(index)
                seen.add(text)
    rng.shuffle(examples)
    val, train = examples[:num_val], examples[num_val:]

    def full_text(index: int) -> str:
        return " ".join(" ".join(all_pages[index][2].values()).split())

    # Pages installed under several names (or identical pages of different tools) appear once, and never when
    # one of their copies is labelled: pretraining must not read a validation page's text.
    corpus, chars, taken = [], 0, {full_text(i) for i in labelled}
    others = [i for i in candidates if i not in labelled] + rest
    rng.shuffle(others)
    for index in others:
        text = full_text(index)
        if len(text) >= 200 and text not in taken and chars < max_corpus_chars:
            taken.add(text)
            corpus.append(text[:max_page_chars])
            chars += len(corpus[-1])
    return write_task(out_dir, {"manpages": corpus}, train, val)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    assemble(sys.argv[1])
