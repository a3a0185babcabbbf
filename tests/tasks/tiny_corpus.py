"""Shared by the stage tests: a tiny made-up corpus, deterministic, with code-like words."""
import random
from pathlib import Path

WORDS = ["def", "return", "self", "x", "(", ")", ":", "=", "+", "1", "if", "else", "for", "in", "\n"]


def write_corpus(root: Path, docs: int = 4, words: int = 3000) -> None:
    """root/corpus/doc<i>.txt: `docs` files of `words` random WORDS each (seeded: pinned losses rely on it)."""
    rng = random.Random(0)
    (root / "corpus").mkdir()
    for i in range(docs):
        (root / "corpus" / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(words)))
