"""Global label vocabularies: per class, pseudo-labels and sampling groups, stable under extension.

Each kind (one of the 9 classes of ``shard_format.CLASSES``, ``"pseudo_label"`` or ``"groups"``)
is an ordered list; a value's id is its position, new values are appended in the order they are
first added, and existing ids never change, so a previous build's ``labels.json`` can be extended.
Group keys are tuples of strings (stored as JSON lists). Unknown is -1 and never stored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from utils import atomic

from .shard_format import CLASSES, UNKNOWN, read_labels

LABELS_FILE = "labels.json"
LABEL_KINDS = (*CLASSES, "pseudo_label", "groups")


def map_labels(label_map: np.ndarray, label_codes: np.ndarray) -> np.ndarray:
    """Global class ids int32 [n, 9] of per-dataset codes [n, 9] (-1: unknown) through a
    dataset's ``LabelVocab.label_map``."""
    codes = np.asarray(label_codes, dtype=np.int64)
    return label_map[np.arange(len(CLASSES)), codes + 1].astype(np.int32)


class LabelVocab:
    def __init__(self):
        self._values: dict[str, list] = {k: [] for k in LABEL_KINDS}
        self._index: dict[str, dict] = {k: {} for k in LABEL_KINDS}

    @staticmethod
    def _check(kind: str) -> None:
        if kind not in LABEL_KINDS:
            raise KeyError(f"unknown label kind {kind!r}; expected one of {LABEL_KINDS}")

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

    def label_map(self, label_values: dict[str, list[str]]) -> np.ndarray:
        """Add a dataset's label values (``IngestedDataset.label_values``); returns its label map,
        int32 [9, 1 + n_codes]: the global id of local code c of class j at ``[j, c + 1]``, unknown
        (-1) in column 0 and past a class's values (what the packer stores per dataset)."""
        width = 1 + max((len(v) for v in label_values.values()), default=0)
        table = np.full((len(CLASSES), width), UNKNOWN, dtype=np.int32)
        for j, cls in enumerate(CLASSES):
            ids = self.add(cls, label_values.get(cls, []))
            table[j, 1:1 + ids.shape[0]] = ids
        return table

    def class_names(self) -> dict[str, list[str]]:
        """Class -> its label names in id order (what ``labels.json`` and a model file hold)."""
        return {c: list(self._values[c]) for c in CLASSES}

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
        doc = {
            "classes": self.class_names(),
            "pseudo_label": self._values["pseudo_label"],
            "groups": [list(g) for g in self._values["groups"]],
        }
        atomic.write_text(Path(directory) / LABELS_FILE,
                          json.dumps(doc, indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> LabelVocab:
        doc = read_labels(Path(directory) / LABELS_FILE)
        vocab = cls()
        for kind, values in (*doc["classes"].items(), ("pseudo_label", doc["pseudo_label"]),
                             ("groups", doc["groups"])):
            vocab.add(kind, values)
        return vocab
