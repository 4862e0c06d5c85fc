"""A generated parallel corpus whose translation needs word reordering (the translation task's default data).

The source language is verb-final with adjectives after nouns; the target language is
subject-verb-object with adjectives before nouns and adverbs at the end:

    source:  DET N [ADJ] [ADV] DET N [ADJ] [PREP DET N] V
    target:  DET [ADJ] N V DET [ADJ] N [PREP DET N] [ADV]

Words are seeded pseudo-words (consonant-vowel syllables) with a one-to-one lexicon, so a model
must learn both the word mapping and the reordering; nothing is copied from source to target.
"""

from __future__ import annotations

import random
from pathlib import Path

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
WORD_CLASSES = {"noun": 40, "adjective": 16, "verb": 20, "adverb": 8, "preposition": 6, "determiner": 3}
SPLIT_SIZES = {"train": 20_000, "valid": 500, "test": 500}


def pseudo_words(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    """``count`` new distinct words of 2-3 consonant-vowel syllables, none of them in ``taken``."""
    words: list[str] = []
    while len(words) < count:
        word = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3)))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def make_lexicon(rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """Per word class, the (source word, target word) pairs of a one-to-one lexicon."""
    taken: set[str] = set()
    return {cls: list(zip(pseudo_words(rng, n, taken), pseudo_words(rng, n, taken)))
            for cls, n in WORD_CLASSES.items()}


def sentence_pair(rng: random.Random, lexicon: dict[str, list[tuple[str, str]]]) -> tuple[str, str]:
    """One (source, target) sentence of the grammar in the module docstring."""
    pick = lambda cls: rng.choice(lexicon[cls])  # noqa: E731

    def noun_phrase(adjective_prob: float) -> tuple[list[str], list[str]]:
        det, noun = pick("determiner"), pick("noun")
        if rng.random() < adjective_prob:
            adj = pick("adjective")
            return [det[0], noun[0], adj[0]], [det[1], adj[1], noun[1]]
        return [det[0], noun[0]], [det[1], noun[1]]

    subj_src, subj_tgt = noun_phrase(0.5)
    obj_src, obj_tgt = noun_phrase(0.5)
    verb = pick("verb")
    adverb = pick("adverb") if rng.random() < 0.4 else None
    if rng.random() < 0.4:
        prep = pick("preposition")
        pp_src, pp_tgt = noun_phrase(0.0)
        pp_src, pp_tgt = [prep[0], *pp_src], [prep[1], *pp_tgt]
    else:
        pp_src, pp_tgt = [], []
    source = [*subj_src, *([adverb[0]] if adverb else []), *obj_src, *pp_src, verb[0]]
    target = [*subj_tgt, verb[1], *obj_tgt, *pp_tgt, *([adverb[1]] if adverb else [])]
    return " ".join(source), " ".join(target)


def write_reordering_corpus(folder: Path, seed: int = 0, sizes: dict[str, int] | None = None) -> Path:
    """Write ``{train,valid,test}.{src,tgt}`` (one sentence per line) under ``folder``; return ``folder``.

    The lexicon and every split are drawn from ``random.Random(seed)``, so the files are the same on
    every machine. Existing complete files are kept.
    """
    sizes = {**SPLIT_SIZES, **(sizes or {})}
    files = [folder / f"{split}.{side}" for split in sizes for side in ("src", "tgt")]
    if all(f.is_file() for f in files):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lexicon = make_lexicon(rng)
    for split, size in sizes.items():
        pairs = [sentence_pair(rng, lexicon) for _ in range(size)]
        for side, index in (("src", 0), ("tgt", 1)):
            part = folder / f".{split}.{side}.partial"
            part.write_text("".join(pair[index] + "\n" for pair in pairs), encoding="utf-8")
            part.replace(folder / f"{split}.{side}")
    return folder
