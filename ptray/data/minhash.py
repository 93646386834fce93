"""Near-duplicate removal (`data.dedup: minhash`): MinHash signatures and LSH banding, as a Ray Data pipeline.

1. Every cleaned document gets a MinHash signature: for each of `num_perm` seeded hash functions, the smallest hash of
   its word `shingle`-grams. Two documents agree on a signature position with probability equal to the Jaccard
   similarity of their shingle sets.
2. The signature is cut into `bands` bands of `rows` positions, chosen so that documents somewhat below the
   `threshold` already share at least one whole band with probability one half (the banding's S-curve), so few pairs
   at the threshold are missed. One row per (document, band) goes through a keyed shuffle across the cluster; each
   group of documents that agree on a whole band gives candidate pairs, its smallest document hash with each other.
3. A candidate pair counts only if its signatures agree on at least `threshold` of their positions. The pairs (about
   one per near-duplicate) are joined on the driver with union-find; each cluster of near-duplicates
   keeps its smallest document hash, and prepare drops the rest before the split, so no near-copy of a training
   document lands in the validation set.

Signatures are computed with arrays, not per-shingle Python: words are hashed once (CRC32), shingle hashes are rolled
from them, and the hash functions are one multiply-add-shift over a (shingles x functions) array.
"""

from __future__ import annotations

import zlib

import numpy as np
import ray.data

_MASK32 = np.uint64(0xFFFFFFFF)


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands x rows <= num_perm whose S-curve 1 - (1 - s^rows)^bands crosses one half nearest to
    `threshold`, preferring more bands (higher recall) on ties."""
    best = None
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        midpoint = (1 - 0.5 ** (1 / bands)) ** (1 / rows)  # the similarity at which P(candidate) = 1/2
        score = (abs(midpoint - threshold), -bands)
        if best is None or score < best[0]:
            best = (score, bands, rows)
    return best[1], best[2]


def _permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """Multipliers and offsets of `num_perm` hash functions h(x) = ((a x + b) mod 2^64) >> 32 over 32-bit x:
    Dietzfelbinger's multiply-add-shift, a strongly universal family, so the functions act independently."""
    rng = np.random.default_rng(0x5EED)  # fixed: signatures must be comparable across runs and machines
    a = rng.integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64, endpoint=True)
    b = rng.integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64, endpoint=True)
    return a, b


def signature(text: str, shingle: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The MinHash signature (num_perm uint32 values) of a document's word `shingle`-grams."""
    words = text.split()
    hashes = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))
    if len(hashes) >= shingle:  # roll k word hashes into one 32-bit shingle hash (products stay below 2^64)
        rolled = np.zeros(len(hashes) - shingle + 1, dtype=np.uint64)
        for j in range(shingle):
            rolled = (rolled * np.uint64(1_000_003) + hashes[j: len(hashes) - shingle + 1 + j]) & _MASK32
        hashes = rolled
    else:  # shorter than one shingle: the whole document is its only shingle
        hashes = np.array([zlib.crc32(text.encode())], dtype=np.uint64)
    hashes = np.unique(hashes)
    with np.errstate(over="ignore"):  # arithmetic mod 2^64 is the hash
        permuted = (hashes[:, None] * a[None, :] + b[None, :]) >> np.uint64(32)
    return permuted.min(axis=0).astype(np.uint32)


def band_rows(batch: dict[str, np.ndarray], *, shingle: int, num_perm: int, bands: int,
              rows: int) -> dict[str, np.ndarray]:
    """Ray Data batch function: documents (text, doc_hash) -> one row per (document, band): band_key (the band's
    index and its values, hashed together) and doc_hash."""
    a, b = _permutations(num_perm)
    hashes = np.asarray(batch["doc_hash"], dtype=np.int64)
    if not len(hashes):
        return {"band_key": np.empty(0, np.int64), "doc_hash": np.empty(0, np.int64)}
    sigs = np.stack([signature(str(t), shingle, a, b) for t in batch["text"]])[:, : bands * rows]
    weights = np.random.default_rng(1).integers(1, 1 << 62, size=rows, dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):  # a hash: wrapping is intended
        keys = (sigs.reshape(len(sigs), bands, rows).astype(np.uint64) * weights).sum(axis=2)
        keys = keys * np.uint64(0x9E3779B97F4A7C15) + np.arange(bands, dtype=np.uint64)  # band index in the key
    return {"band_key": keys.astype(np.int64).ravel(), "doc_hash": np.repeat(hashes, bands)}


def band_edges(block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data batch function over one hash partition of band rows (every row of a band key is in it): for each
    group of documents that agree on a whole band, edges from the smallest document hash to the others."""
    key, doc = np.asarray(block["band_key"], np.int64), np.asarray(block["doc_hash"], np.int64)
    order = np.lexsort((doc, key))
    key, doc = key[order], doc[order]
    distinct = np.r_[True, (key[1:] != key[:-1]) | (doc[1:] != doc[:-1])]  # an exact copy counts once
    key, doc = key[distinct], doc[distinct]
    first = np.r_[True, key[1:] != key[:-1]]  # the first (smallest) document of each group
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(key)), 0))
    return {"a": doc[group_start][~first], "b": doc[~first]}


def candidate_signatures(batch: dict[str, np.ndarray], *, candidates: np.ndarray, shingle: int,
                         num_perm: int) -> dict[str, np.ndarray]:
    """Ray Data batch function: the signatures of the documents that are in some candidate pair."""
    a, b = _permutations(num_perm)
    hashes = np.asarray(batch["doc_hash"], dtype=np.int64)
    wanted = np.flatnonzero(np.isin(hashes, candidates))
    sigs = [signature(str(batch["text"][i]), shingle, a, b).tobytes() for i in wanted]  # bytes: one Arrow column
    return {"doc_hash": hashes[wanted], "signature": np.array(sigs, dtype=object)}


def near_duplicates(docs: ray.data.Dataset, *, threshold: float, shingle: int, num_perm: int,
                    num_blocks: int) -> np.ndarray:
    """The document hashes to drop (sorted): all but the smallest of each cluster of near-duplicates among `docs`
    (a Dataset with `text` and `doc_hash`; exact copies share a hash and count once). `num_blocks`: partitions of the
    band shuffle.

    The bands are set for a similarity below the threshold (more candidates, few missed); each candidate pair is then
    kept only if its signatures agree on at least `threshold` of their positions (the estimated Jaccard similarity),
    which needs the candidates' signatures once more: a second, filtered pass over `docs`."""
    bands, rows = lsh_bands(max(0.05, threshold - 0.15), num_perm)
    candidates = docs.map_batches(band_rows, batch_format="numpy", batch_size=1024,
                                  fn_kwargs=dict(shingle=shingle, num_perm=num_perm, bands=bands, rows=rows))
    candidates = candidates.repartition(num_blocks, keys=["band_key"]).map_batches(
        band_edges, batch_format="numpy", batch_size=None)
    pairs = set()
    for batch in candidates.iter_batches(batch_format="numpy", batch_size=65536):
        pairs.update(zip(batch["a"].tolist(), batch["b"].tolist()))
    if not pairs:
        return np.empty(0, dtype=np.int64)
    involved = np.array(sorted({x for pair in pairs for x in pair}), dtype=np.int64)
    signatures = {}
    for batch in docs.map_batches(candidate_signatures, batch_format="numpy", batch_size=1024,
                                  fn_kwargs=dict(candidates=involved, shingle=shingle, num_perm=num_perm)
                                  ).iter_batches(batch_format="numpy", batch_size=4096):
        signatures.update((h, np.frombuffer(sig, dtype=np.uint32))
                          for h, sig in zip(batch["doc_hash"].tolist(), batch["signature"]))
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])  # path halving
            x = parent[x]
        return x

    for x, y in sorted(pairs):
        if np.mean(signatures[x] == signatures[y]) < threshold:
            continue
        rx, ry = root(x), root(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)  # every cluster's root is its smallest hash: the one kept
    return np.array(sorted(x for x in parent if root(x) != x), dtype=np.int64)
