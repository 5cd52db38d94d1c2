"""Answer metrics for LoCoMo, as the reference works compute them.

- `f1`: token F1 as Mem0 and Memory-R1 compute it (the A-Mem utility): lowercase, `.,!?` turned into
  spaces, whitespace split, F1 of the two token *sets*. This is the F1 the TSUBASA paper reports.
- `f1_locomo`: the LoCoMo authors' variant: lowercase, punctuation, commas and the words
  a/an/the/and removed, Porter-stemmed, F1 of token *multisets*; multi-hop answers (category 1) are
  split on commas and each gold part takes its best-matching predicted part; open-domain gold
  answers (category 3) keep only the part before the first `;`.
- `bleu1`: sentence BLEU with unigram weights and NLTK smoothing method 1, lowercase tokens.

All scores are in [0, 1]; reports print them x100.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache

_SIMPLE_PUNCT = str.maketrans({".": " ", ",": " ", "!": " ", "?": " "})
_ARTICLES = re.compile(r"\b(a|an|the|and)\b")
_PUNCT = set(string.punctuation)


def simple_tokens(text: object) -> list[str]:
    """Mem0/Memory-R1 tokenisation: lowercase, `.,!?` -> space, split on whitespace."""
    return str(text).lower().translate(_SIMPLE_PUNCT).split()


def _prf(common: int, n_pred: int, n_gold: int) -> float:
    if common == 0 or n_pred == 0 or n_gold == 0:
        return 0.0
    precision, recall = common / n_pred, common / n_gold
    return 2 * precision * recall / (precision + recall)


def f1(prediction: object, gold: object) -> float:
    """Token-set F1 (Mem0 / Memory-R1 / TSUBASA)."""
    pred, ref = set(simple_tokens(prediction)), set(simple_tokens(gold))
    return _prf(len(pred & ref), len(pred), len(ref))


def normalize_answer(text: object) -> str:
    """LoCoMo normalisation: drop commas, lowercase, drop punctuation and a/an/the/and, squeeze spaces."""
    s = str(text).replace(",", "").lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem import PorterStemmer

    return PorterStemmer()


def _stems(text: object) -> list[str]:
    stem = _stemmer().stem
    return [stem(w) for w in normalize_answer(text).split()]


def f1_stemmed(prediction: object, gold: object) -> float:
    """LoCoMo's single-answer F1: stemmed token multisets."""
    pred, ref = _stems(prediction), _stems(gold)
    common = sum((Counter(pred) & Counter(ref)).values())
    return _prf(common, len(pred), len(ref))


def f1_locomo(prediction: object, gold: object, category: int) -> float:
    """The LoCoMo authors' F1 for a question of `category` (1 multi-hop ... 4 single-hop)."""
    pred, ref = str(prediction), str(gold)
    if category == 3:
        ref = ref.split(";")[0].strip()
    if category == 1:
        preds = [p.strip() for p in pred.split(",")]
        golds = [g.strip() for g in ref.split(",")]
        return sum(max(f1_stemmed(p, g) for p in preds) for g in golds) / len(golds)
    return f1_stemmed(pred, ref)


@lru_cache(maxsize=1)
def _word_tokenizer():
    # NLTKWordTokenizer is what nltk.word_tokenize applies per sentence; calling it directly needs no
    # `punkt` download (this machine has no NLTK data server), and LoCoMo answers are one sentence.
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def word_tokens(text: object) -> list[str]:
    """nltk word tokens of the lowercased text (as `nltk.word_tokenize(text.lower())` on one sentence)."""
    return _word_tokenizer().tokenize(str(text).lower())


def bleu1(prediction: object, gold: object) -> float:
    """Sentence BLEU-1 with smoothing method 1 (Mem0 / Memory-R1 / A-Mem); 0 for an empty side."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    pred, ref = word_tokens(prediction), word_tokens(gold)
    if not pred or not ref:
        return 0.0
    return float(sentence_bleu([ref], pred, weights=(1, 0, 0, 0),
                               smoothing_function=SmoothingFunction().method1))


def answer_scores(prediction: object, gold: object, category: int) -> dict[str, float]:
    """Every per-answer metric: `f1`, `f1_locomo`, `bleu1` (each in [0, 1])."""
    return {"f1": f1(prediction, gold), "f1_locomo": f1_locomo(prediction, gold, category),
            "bleu1": bleu1(prediction, gold)}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); 0.0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
