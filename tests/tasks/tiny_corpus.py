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


def write_domain_corpus(root: Path) -> None:
    """root/corpus/{a,b}/doc<i>.txt: two domains of two files each, drawn from different word sets."""
    rng = random.Random(0)
    for i, domain in enumerate("aabb"):
        (root / "corpus" / domain).mkdir(parents=True, exist_ok=True)
        vocab = WORDS[:10] if domain == "a" else WORDS[5:]          # the domains differ
        (root / "corpus" / domain / f"doc{i}.txt").write_text(" ".join(rng.choice(vocab) for _ in range(3000)))
