"""A word-level tokenizer for the demo world that behaves like a CLIP tokenizer for a pipeline.

``tokenizer(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")``
returns an object with ``input_ids`` (``<bos> words <eos> <pad>...``). Unknown words map to
``<unk>``; punctuation is ignored. The vocabulary is fixed by :mod:`world` and stored with the
weights, so that ids never change under the shipped model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")


class TokenizerOutput(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


class DemoTokenizer:
    pad_token_id, bos_token_id, eos_token_id, unk_token_id = 0, 1, 2, 3

    def __init__(self, words, model_max_length: int = 16):
        self.vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL)}
        for word in words:
            self.vocab.setdefault(word, len(self.vocab))
        self.model_max_length = model_max_length

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    @classmethod
    def from_file(cls, path: str | Path) -> DemoTokenizer:
        data = json.loads(Path(path).read_text())
        words = [w for w, _ in sorted(data["vocab"].items(), key=lambda kv: kv[1]) if w not in SPECIAL]
        tok = cls(words, data["model_max_length"])
        if tok.vocab != data["vocab"]:
            raise ValueError(f"{path}: vocabulary ids do not match the tokenizer's layout")
        return tok

    def save(self, path: str | Path) -> None:
        Path(path).write_text(
            json.dumps({"vocab": self.vocab, "model_max_length": self.model_max_length}, indent=1)
        )

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        max_length = max_length or self.model_max_length
        ids = [self.vocab.get(w, self.unk_token_id) for w in self.tokenize(text)][: max_length - 2]
        ids = [self.bos_token_id, *ids, self.eos_token_id]
        return ids + [self.pad_token_id] * (max_length - len(ids))

    def decode(self, ids) -> str:
        inverse = {i: w for w, i in self.vocab.items()}
        return " ".join(inverse.get(int(i), "<unk>") for i in ids if int(i) not in (0, 1, 2))

    def __call__(self, texts, padding="max_length", max_length=None, truncation=True, return_tensors=None):
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        ids = [self.encode(t, max_length) for t in batch]
        if return_tensors == "pt":
            import torch

            return TokenizerOutput(input_ids=torch.tensor(ids, dtype=torch.long))
        return TokenizerOutput(input_ids=ids[0] if single else ids)
