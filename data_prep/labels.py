"""Global label vocabularies: per class, pseudo-labels and sampling groups, stable under extension.

Each kind (one of the 9 classes of ``shard_format.CLASSES``, ``"pseudo_label"`` or ``"groups"``)
is an ordered list; a value's id is its position, new values are appended in the order they are
first added, and existing ids never change, so a previous build's ``labels.json`` can be extended.
Group keys are tuples of strings (stored as JSON lists). Unknown is -1 and never stored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .shard_format import CLASSES, UNKNOWN, read_labels

LABELS_FILE = "labels.json"
KINDS = (*CLASSES, "pseudo_label", "groups")


class LabelVocab:
    def __init__(self):
        self._values: dict[str, list] = {k: [] for k in KINDS}
        self._index: dict[str, dict] = {k: {} for k in KINDS}

    @staticmethod
    def _check(kind: str) -> None:
        if kind not in KINDS:
            raise KeyError(f"unknown label kind {kind!r}; expected one of {KINDS}")

    @staticmethod
    def _key(kind: str, value):
        return tuple(str(v) for v in value) if kind == "groups" else str(value)

    def add(self, kind: str, values: Iterable) -> np.ndarray:
        """Ids (int64) of ``values``, appending the new ones; None maps to -1 (unknown)."""
        return self._ids(kind, values, grow=True)

    def lookup(self, kind: str, values: Iterable) -> np.ndarray:
        """Ids of existing values (KeyError for a value not in the vocabulary); None -> -1."""
        return self._ids(kind, values, grow=False)

    def _ids(self, kind: str, values: Iterable, grow: bool) -> np.ndarray:
        self._check(kind)
        index, stored = self._index[kind], self._values[kind]
        out = []
        for v in values:
            if v is None:
                out.append(UNKNOWN)
                continue
            key = self._key(kind, v)
            i = index.get(key)
            if i is None:
                if not grow:
                    raise KeyError(f"{kind} label {key!r} is not in the label vocabulary")
                i = index[key] = len(stored)
                stored.append(key)
            out.append(i)
        return np.asarray(out, dtype=np.int64)

    def values(self, kind: str) -> list:
        """The stored values of a kind, in id order (group keys as tuples)."""
        self._check(kind)
        return list(self._values[kind])

    def add_dataset(
        self, label_codes: np.ndarray, label_values: dict[str, list[str]]
    ) -> np.ndarray:
        """Global class ids int32 [n, 9] for a dataset's per-dataset codes (``IngestedDataset``)."""
        out = np.full(label_codes.shape, UNKNOWN, dtype=np.int32)
        for j, cls in enumerate(CLASSES):
            table = np.append(self.add(cls, label_values.get(cls, [])), UNKNOWN).astype(np.int32)
            out[:, j] = table[np.asarray(label_codes[:, j])]  # code -1 reads the last slot
        return out

    def n_labels(self) -> dict[str, int]:
        return {c: len(self._values[c]) for c in CLASSES}

    def to_manifest(self, path: str = f"vocab/{LABELS_FILE}") -> dict:
        """The manifest's ``labels`` entry (``path`` relative to the output folder)."""
        return {
            "file": path,
            "classes": list(CLASSES),
            "n_labels": self.n_labels(),
            "n_pseudo_labels": len(self._values["pseudo_label"]),
            "n_groups": len(self._values["groups"]),
        }

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        doc = {
            "classes": {c: self._values[c] for c in CLASSES},
            "pseudo_label": self._values["pseudo_label"],
            "groups": [list(g) for g in self._values["groups"]],
        }
        tmp = d / f".{LABELS_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, d / LABELS_FILE)

    @classmethod
    def load(cls, directory: str | Path) -> LabelVocab:
        doc = read_labels(Path(directory) / LABELS_FILE)
        vocab = cls()
        for kind, values in (*doc["classes"].items(), ("pseudo_label", doc["pseudo_label"]),
                             ("groups", doc["groups"])):
            vocab.add(kind, values)
        return vocab
