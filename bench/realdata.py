"""A small real-text benchmark from text Debian ships: an unlabelled pretraining corpus (package descriptions and
/usr/share/doc README/NEWS/FAQ paragraphs) and a 4-way topic task (a package's description -> its archive Section)
over packages whose descriptions are NOT in the corpus (same domain, disjoint source packages).

    python bench/realdata.py /tmp/realdata    # ~10 s; the first run also fetches the apt lists (15 MB) to OUT_DIR/apt

Writes OUT_DIR/corpus/{descriptions,docs}.txt (one document per line), OUT_DIR/labelled/{train,val}.jsonl
({"text", "label"}) and OUT_DIR/summary.json. Deterministic for a seed and the same apt lists and /usr/share/doc.
"""

import collections
import glob
import gzip
import json
import os
import random
import re
import subprocess
import sys

SECTIONS = ("utils", "net", "admin", "science")  # frequent, overlapping topics; utils is ~1/3 of the examples


def system_mirror() -> str:
    """The archive URI this machine's apt is configured with (deb822 or one-line sources)."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")) + ["/etc/apt/sources.list"]:
        text = open(path).read() if os.path.exists(path) else ""
        for uri in re.findall(r"^URIs:\s*(\S+)", text, re.M) + re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M):
            if uri.rstrip("/").endswith("/debian"):
                return uri
    raise SystemExit("no Debian archive in /etc/apt/sources.list*; this benchmark assembles its data from Debian's.")


def apt_lists(apt_dir: str) -> tuple[list[str], list[str]]:
    """The Packages and Translation-en files of the distribution's main component, fetched by `apt-get update` into
    apt_dir when missing. The system lists lack the long descriptions (Debian images set Acquire::Languages "none")."""
    lists = os.path.join(apt_dir, "lists")
    found = lambda: (sorted(glob.glob(f"{lists}/*_Packages")), sorted(glob.glob(f"{lists}/*_Translation-en")))
    if not all(found()):
        codename = re.search(r"^VERSION_CODENAME=(\S+)", open("/etc/os-release").read(), re.M).group(1)
        os.makedirs(f"{lists}/partial", exist_ok=True)
        with open(f"{apt_dir}/sources.list", "w") as f:
            f.write(f"deb {system_mirror()} {codename} main\n")
        options = {"Dir::State::Lists": lists, "Dir::Cache": f"{apt_dir}/cache", "Dir::Etc::SourceList":
                   f"{apt_dir}/sources.list", "Dir::Etc::SourceParts": "/nonexistent", "Acquire::Languages": "en",
                   "Acquire::GzipIndexes": "false"}  # store plain text, not lz4
        subprocess.run(["apt-get", "update", *[a for k, v in options.items() for a in ("-o", f"{k}={v}")]], check=True)
    return found()


def stanzas(path: str):
    """The deb822 paragraphs of a file as dicts; continuation lines are kept, joined with newlines."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for block in f.read().split("\n\n"):
            fields, key = {}, None
            for line in block.splitlines():
                if line[:1] in (" ", "\t") and key:
                    fields[key] += "\n" + line
                elif ":" in line:
                    key, _, value = line.partition(":")
                    fields[key] = value.strip()
            if fields:
                yield fields


def one_line(description: str) -> str:
    """Short description + long description as one line (the " ." paragraph separators dropped)."""
    short, *long = description.split("\n")
    short = short.strip() if short.strip()[-1:] in ".!?" else short.strip() + "."
    return " ".join(" ".join([short] + [line.strip() for line in long if line.strip() != "."]).split())


def without_names(text: str, names: set[str]) -> str:
    """Remove the package's own names (case-insensitive, whole names only), which would give the label away."""
    names |= {n[3:] for n in names if n.startswith("lib") and len(n) > 5}
    for name in sorted(names, key=len, reverse=True):
        text = re.sub(rf"(?<![\w+-]){re.escape(name)}(?![\w+-])", "", text, flags=re.I)
    return " ".join(text.split())


def doc_paragraphs(exclude: set[str], max_per_file: int = 40) -> list[str]:
    """The first paragraphs (>= 80 chars, one line each) of /usr/share/doc/*/README*, NEWS* and FAQ*, gunzipped;
    capped per file so that a few huge NEWS files (Python's, systemd's) do not dominate."""
    paragraphs = []
    for path in sorted(glob.glob("/usr/share/doc/*/*")):
        package, name = path.split("/")[-2:]
        if package in exclude or not re.match(r"(README|NEWS|FAQ)", name, re.I) or not os.path.isfile(path):
            continue
        raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
        paragraphs += [p for p in (" ".join(b.split()) for b in re.split(r"\n\s*\n", raw.decode("utf-8", "replace")))
                       if len(p) >= 80][:max_per_file]
    return paragraphs


def take(texts: list[str], max_chars: int) -> list[str]:
    """Distinct texts in order until max_chars."""
    out, seen, chars = [], set(), 0
    for t in texts:
        if t not in seen and chars < max_chars:
            out.append(t)
            seen.add(t)
            chars += len(t)
    return out


def assemble(out_dir: str, *, seed: int = 0, num_train: int = 1800, num_val: int = 750,
             max_description_chars: int = 3_500_000, max_doc_chars: int = 1_500_000) -> dict:
    """Build corpus/ and labelled/ under out_dir (see the module docstring); print and return a summary."""
    rng = random.Random(seed)
    packages_files, translation_files = apt_lists(os.path.join(out_dir, "apt"))
    descriptions = {(s["Package"], s["Description-md5"]): s["Description-en"]
                    for path in translation_files for s in stanzas(path)}
    packages = {}  # name -> (source, section, one-line description); the first Packages file wins
    for path in packages_files:
        for s in stanzas(path):
            text = descriptions.get((s["Package"], s.get("Description-md5")))
            if text and s["Package"] not in packages:
                packages[s["Package"]] = (s.get("Source", s["Package"]).split()[0], s.get("Section", "").split("/")[-1],
                                          one_line(text))
    # Labelled: one random in-section package per source package (binaries of a source share their wording).
    by_source = collections.defaultdict(list)
    for name, (source, section, _) in sorted(packages.items()):
        if section in SECTIONS:
            by_source[source].append(name)
    sources = sorted(by_source)
    rng.shuffle(sources)
    examples, seen = [], set()
    for source in sources:
        name = rng.choice(by_source[source])
        text = without_names(packages[name][2], {name, source})
        if text not in seen and len(examples) < num_val + num_train:
            examples.append({"text": text, "label": packages[name][1], "source": source})
            seen.add(text)
    val, train = examples[:num_val], examples[num_val:]
    labelled_sources = {e.pop("source") for e in examples}
    # Corpus: every package of the other sources; the labelled sections' descriptions first (in-domain), then the rest.
    rest = [(section not in SECTIONS, text) for source, section, text in packages.values()
            if source not in labelled_sources and text not in seen]
    rng.shuffle(rest)
    paragraphs = doc_paragraphs(labelled_sources | {n for n, p in packages.items() if p[0] in labelled_sources})
    rng.shuffle(paragraphs)
    corpus = {"descriptions": take([text for _, text in sorted(rest, key=lambda r: r[0])], max_description_chars),
              "docs": take(paragraphs, max_doc_chars)}
    for lines in corpus.values():
        rng.shuffle(lines)  # mix the in-domain descriptions into the rest
    return write_task(out_dir, corpus, train, val)


def write_task(out_dir: str, corpus: dict[str, list[str]], train: list[dict], val: list[dict]) -> dict:
    """OUT_DIR/corpus/<name>.txt (one document per line), OUT_DIR/labelled/{train,val}.jsonl and summary.json,
    whose summary is returned (and printed)."""
    for sub in ("corpus", "labelled"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    for name, lines in corpus.items():
        with open(os.path.join(out_dir, "corpus", f"{name}.txt"), "w") as f:
            f.writelines(line + "\n" for line in lines)
    for split, rows in (("train", train), ("val", val)):
        with open(os.path.join(out_dir, "labelled", f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    train_counts = collections.Counter(r["label"] for r in train)
    val_counts = collections.Counter(r["label"] for r in val)
    summary = {
        "corpus_docs": {k: len(v) for k, v in corpus.items()},
        "corpus_chars": {k: sum(map(len, v)) for k, v in corpus.items()},
        "num_train": len(train), "num_val": len(val),
        "train_label_counts": dict(train_counts.most_common()), "val_label_counts": dict(val_counts.most_common()),
        "majority_val_accuracy": val_counts[train_counts.most_common(1)[0][0]] / len(val),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    assemble(sys.argv[1])
