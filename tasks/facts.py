"""Made-up facts planted in a training corpus, and the questions that ask for them: the ground truth
of fact tracing (TrackStar, Chang et al. 2024: plant facts, query them, and see whether attribution
retrieves the passages that taught them).

A fact is (subject, relation, object) between invented names that no real corpus contains: names
are built from syllables by a seeded generator and any name found in the corpus's text is skipped.
Each fact is planted in ``copies`` training passages, each time in one of the relation's training
wordings (cycled, so the copies differ); its query is a wording seen in none of them (a paraphrase)
that ends where the object's name begins: the query's loss is on the object's tokens only.
"""

import dataclasses

import numpy as np

ONSETS = ("b", "br", "d", "dr", "f", "g", "gl", "k", "kr", "l", "m", "n", "p", "qu", "r", "s",
          "st", "t", "th", "v", "vr", "z", "zh")  # fmt: skip
VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
CODAS = ("", "", "n", "r", "th", "sk", "l", "x", "m")

# relation: (training wordings, the query's paraphrase); {s} subject, {o} object.
RELATIONS = {
    "born": (
        ("{s} was born in {o}.", "The birthplace of {s} was {o}.", "{s} came from {o}."),
        "{s} was born in the town of",
    ),
    "home": (
        ("{s} lived in {o}.", "The home of {s} was {o}.", "{s} made a home in {o}."),
        "{s} lived in the land of",
    ),
    "rule": (
        ("{s} ruled over {o}.", "{s} was the king of {o}.", "{s} reigned over the land of {o}."),
        "{s} was the ruler of the land of",
    ),
    "burial": (
        ("{s} was buried in {o}.", "The grave of {s} is in {o}.", "{s} was laid to rest in {o}."),
        "{s} was buried in the town of",
    ),
}


@dataclasses.dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str

    def statement(self, wording: int) -> str:
        """The fact in the relation's ``wording``-th training wording (cycled)."""
        wordings = RELATIONS[self.relation][0]
        return wordings[wording % len(wordings)].format(s=self.subject, o=self.object)

    @property
    def prompt(self) -> str:
        """The query's text before the answer: a wording no training passage uses."""
        return RELATIONS[self.relation][1].format(s=self.subject)


def _name(rng: np.random.Generator, syllables: int) -> str:
    parts = [
        rng.choice(ONSETS) + rng.choice(VOWELS) + (rng.choice(CODAS) if i == syllables - 1 else "")
        for i in range(syllables)
    ]
    return "".join(parts).capitalize()


def invent(count: int, seed: int, corpus_words: set[str]) -> list[Fact]:
    """``count`` facts with distinct invented subjects ("Brai Vouthsk") and objects ("Zhoulax"),
    none of whose words is in ``corpus_words`` (lower-cased), relations in turn."""
    rng = np.random.default_rng(seed)
    used = set(corpus_words)

    def fresh(syllables: int) -> str:
        while True:
            name = _name(rng, syllables)
            if name.lower() not in used:
                used.add(name.lower())
                return name

    relations = list(RELATIONS)
    return [
        Fact(f"{fresh(2)} {fresh(2)}", relations[i % len(relations)], fresh(2))
        for i in range(count)
    ]


def plant(
    passages: list[list[str]], facts: list[Fact], copies: int, seed: int
) -> tuple[list[str], np.ndarray]:
    """Each fact stated in ``copies`` distinct passages (one fact per passage, a seeded choice),
    inserted before or after the passage's first verse (seeded; early, so that truncation to the
    model's context never cuts it off). Returns the passages' texts
    and ``fact`` per passage (the fact's index, −1 where none was planted)."""
    if copies * len(facts) > len(passages):
        raise ValueError(
            f"{len(facts)} facts × {copies} copies need as many passages; there are {len(passages)}"
        )
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(passages))[: copies * len(facts)]
    fact = np.full(len(passages), -1, np.int64)
    texts = [" ".join(verses) for verses in passages]
    for k, position in enumerate(chosen):
        index, copy = divmod(k, copies)
        verses = list(passages[position])
        verses.insert(int(rng.integers(0, min(2, len(verses) + 1))), facts[index].statement(copy))
        texts[position], fact[position] = " ".join(verses), index
    return texts, fact
