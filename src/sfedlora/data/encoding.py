"""Tokenise a split once; build padded batches from any subset of its examples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .examples import Examples


@dataclass
class Encoded:
    features: list[dict[str, list[int]]]  # per example: input_ids (and token_type_ids)
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.features)

    def subset(self, idx) -> Encoded:
        return Encoded([self.features[i] for i in idx], self.labels[np.asarray(idx, dtype=np.int64)])

    @classmethod
    def concat(cls, parts: list[Encoded]) -> Encoded:
        """The examples of ``parts``, one after another (several clients' rows in one batch)."""
        return cls([f for p in parts for f in p.features], np.concatenate([p.labels for p in parts]))

    def lengths(self) -> np.ndarray:
        return np.fromiter(
            (len(f["input_ids"]) for f in self.features), dtype=np.int64, count=len(self.features)
        )

    def collate(self, idx, tokenizer) -> dict[str, torch.Tensor]:
        # A method, so training takes batches from any encoded task alike (see data.lm.LMEncoded).
        return collate(self, idx, tokenizer)


def encode(examples: Examples, tokenizer, max_length: int) -> Encoded:
    enc = tokenizer(examples.texts, examples.pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
    features = [{k: enc[k][i] for k in keys} for i in range(len(examples))]
    return Encoded(features, examples.labels)


def collate(encoded: Encoded, idx, tokenizer) -> dict[str, torch.Tensor]:
    """A batch padded to its longest example (dynamic padding)."""
    batch = tokenizer.pad([encoded.features[i] for i in idx], return_tensors="pt")
    labels = encoded.labels[np.asarray(idx)]
    batch["labels"] = torch.from_numpy(labels)
    return dict(batch)


def length_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Indices in batches of similar length (evaluation), so little compute goes to padding."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
