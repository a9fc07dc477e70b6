"""Sentence-pair classification tasks (QNLI recipe): loading, fingerprinting, batching.

Every task yields lists of :class:`Example` for ``train`` and ``validation``. Label 0 is
*entailment* (the sentence answers the question), 1 *not_entailment*, as in GLUE QNLI.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import random
from dataclasses import dataclass
from importlib import resources
from typing import Iterator

import torch

QNLI_SQUAD_FILE = "qnli_squad.jsonl.gz"


@dataclass(frozen=True)
class Example:
    question: str
    sentence: str
    label: int


@dataclass
class Task:
    name: str
    train: list[Example]
    validation: list[Example]

    def fingerprint(self, split: str) -> str:
        """Content hash of a split: the cache key changes whenever the data does."""
        h = hashlib.sha256()
        for ex in getattr(self, split):
            h.update(json.dumps([ex.question, ex.sentence, ex.label]).encode())
        return h.hexdigest()[:16]


class DataError(ValueError):
    """A task's data is missing or malformed."""


def load_task(cfg) -> Task:
    """Build the task named by ``cfg.name`` and cap its splits."""
    loaders = {"qnli-squad": _qnli_squad, "qnli": _glue_qnli, "synthetic": _synthetic}
    train, val = loaders[cfg.name](cfg)
    for split, rows in (("train", train), ("validation", val)):
        if not rows:
            raise DataError(f"task {cfg.name}: the {split} split is empty")
        bad = [ex.label for ex in rows if ex.label not in (0, 1)]
        if bad:
            raise DataError(f"task {cfg.name}: {split} has labels {sorted(set(bad))[:5]}; allowed: 0, 1")
    return Task(cfg.name, _cap(train, cfg.max_train_samples, cfg.seed), _cap(val, cfg.max_eval_samples, cfg.seed))


def _cap(rows: list[Example], n: int | None, seed: int) -> list[Example]:
    """A fixed random subset (so a cap keeps the class balance in expectation)."""
    if n is None or n >= len(rows):
        return rows
    idx = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in idx]


def _qnli_squad(cfg) -> tuple[list[Example], list[Example]]:
    path = cfg.path or resources.files("transquant.data").joinpath(QNLI_SQUAD_FILE)
    splits: dict[str, list[Example]] = {"train": [], "validation": []}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                row = json.loads(line)
                splits[row["split"]].append(Example(row["question"], row["sentence"], int(row["label"])))
    except (OSError, json.JSONDecodeError, KeyError, ValueError) as err:
        raise DataError(f"task qnli-squad: cannot read {path}: {err}") from err
    return splits["train"], splits["validation"]


def _glue_qnli(cfg) -> tuple[list[Example], list[Example]]:
    """GLUE QNLI from the Hugging Face hub (needs network or a populated HF cache)."""
    from datasets import load_dataset

    ds = load_dataset("glue", "qnli")
    conv = lambda split: [Example(r["question"], r["sentence"], int(r["label"])) for r in ds[split]]
    return conv("train"), conv("validation")


# Every word is one WordPiece of the MiniLM/BERT uncased vocabulary (tests check it), so the model
# sees whole nouns and truncation never hides one.
SYNTHETIC_PLACES = ("river castle harbor garden forest canyon meadow glacier temple orchard").split()
SYNTHETIC_THINGS = ("engine violin planet mirror rocket lantern marble falcon copper compass").split()
SYNTHETIC_LENGTHS = (3, 5, 7, 9)  # nouns per sentence: odd, so places and things never tie


def _synthetic(cfg) -> tuple[list[Example], list[Example]]:
    """Generated QNLI-style pairs that a random tiny BERT learns in a few dozen steps, but not
    perfectly: answer-type entailment by a noun vote.

    The question is always "where is the X?" (X a thing); the sentence lists an odd number
    (3-9) of nouns, each a place or a thing. It answers the question (label 0, *entailment*)
    when places are the majority, else not (label 1). Why this shape:

    * learnable fast: every noun is a lexical cue from the first step (a place pushes towards
      entailment), which a random model averaging its tokens picks up within ~50 steps. Rules
      with no such first-order cue (whether the question's noun appears in the sentence, whether
      the sentence's subject is the question's, a question type that flips the answer type)
      stayed at chance on model=tiny for 200 steps at lr 3e-3 and 1e-2; the old rule, whose only
      cue was the sentence's first word ("the X is ..." / "no Y was ..."), stayed at chance on
      most training seeds at the old train=quick (lr 1e-3) and is learnt perfectly when it is;
    * not trivial: the majority goes down to one noun (5 places against 4 things, about 30 % of
      the pairs), so the decision is a count, not a single token. model=tiny with train=quick
      ends ~94-98 % right and its errors are the one-noun majorities, the examples quantization
      noise can flip. The question only frames the pair (its noun is always a thing; a model
      that counted it with the sentence's nouns would turn every one-noun win into a tie);
    * balanced and deterministic: labels alternate (exactly half of each split for an even
      size), the number of majority nouns is uniform on the winning side, and everything comes
      from ``random.Random(cfg.seed)``: train first, then validation, from one stream.
    """
    rng = random.Random(cfg.seed)

    def make(n: int) -> list[Example]:
        rows = []
        for i in range(n):
            label = i % 2
            k = rng.choice(SYNTHETIC_LENGTHS)
            places = rng.randint(k // 2 + 1, k) if label == 0 else rng.randint(0, k // 2)
            nouns = rng.choices(SYNTHETIC_PLACES, k=places) + rng.choices(SYNTHETIC_THINGS, k=k - places)
            rng.shuffle(nouns)
            rows.append(Example(f"where is the {rng.choice(SYNTHETIC_THINGS)}?", " ".join(nouns) + ".", label))
        return rows

    return make(cfg.synthetic_train_size), make(cfg.synthetic_eval_size)


def encode(tokenizer, rows: list[Example], max_length: int) -> list[dict]:
    """Tokenize pairs once; batches are padded later to their own longest sequence."""
    enc = tokenizer([r.question for r in rows], [r.sentence for r in rows], truncation=True,
                    max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "labels": r.label} for i, r in enumerate(rows)]


def batches(items: list[dict], batch_size: int, pad_id: int, shuffle_seed: int | None = None,
            by_length: bool = False) -> Iterator[dict]:
    """Padded tensor batches. ``by_length`` groups similar lengths (eval: less padding, same result)."""
    order = list(range(len(items)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    elif by_length:
        order.sort(key=lambda i: len(items[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[start:start + batch_size]]
        width = max(len(c["input_ids"]) for c in chunk)
        out = {}
        for key in chunk[0]:
            if key == "labels":
                out[key] = torch.tensor([c[key] for c in chunk])
            else:
                fill = pad_id if key == "input_ids" else 0
                out[key] = torch.tensor([c[key] + [fill] * (width - len(c[key])) for c in chunk])
        yield out


def n_batches(n_items: int, batch_size: int) -> int:
    return (n_items + batch_size - 1) // batch_size
