"""A model opened for reading weight by weight: a single-file checkpoint or a diffusers folder.

Parameter names are the ones :mod:`lib_scheduled_lora.core.naming` reads (a diffusers folder's
with ``unet.`` / ``text_encoder.`` / ``text_encoder_2.`` prefixes), so the model index maps kohya
names onto them. Nothing is read until asked for, and a read is one tensor
(:class:`~lib_scheduled_lora.core.safetensors_stream.SafetensorsReader`): extracting a LoRA from
two SDXL checkpoints holds two layers, not two models.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lib_scheduled_lora.core.naming import ModelIndex, Slot, model_index
from lib_scheduled_lora.core.safetensors_stream import SafetensorsReader
from lib_scheduled_lora.errors import ModelFormatError


class ModelReader:
    """Use as a context manager (it keeps its files open)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise ModelFormatError(self.path, "not found")
        self._readers: list[SafetensorsReader] = []
        self._where: dict[str, tuple[SafetensorsReader, str]] = {}
        try:
            if self.path.is_dir():
                self._open_folder()
            else:
                reader = self._open(self.path)
                self._where = {name: (reader, name) for name in reader.entries}
        except BaseException:
            self.close()
            raise
        self.shapes = {name: reader.entries[key].shape for name, (reader, key) in self._where.items()}
        self.index: ModelIndex = model_index(self.shapes)
        if self.index.layout == "unknown":
            self.close()
            raise ModelFormatError(
                self.path, "not a Stable Diffusion model: no UNet or text encoder weights"
            )

    def _open(self, path: Path) -> SafetensorsReader:
        reader = SafetensorsReader(path)
        self._readers.append(reader)
        return reader

    def _open_folder(self) -> None:
        # The same files a merge would rewrite; of several variants (fp16...), the default one.
        from lib_scheduled_lora.core.merge import DIFFUSERS_COMPONENTS, _variant, _weight_files

        files = _weight_files(self.path)
        for component in DIFFUSERS_COMPONENTS:
            mine = [f for f in files if f.component == component]
            variants = sorted({_variant(f.path) for f in mine})
            chosen = "" if "" in variants else variants[0] if variants else None
            for f in mine:
                if _variant(f.path) == chosen:
                    reader = self._open(f.path)
                    self._where.update({f"{component}.{key}": (reader, key) for key in reader.entries})

    def dtype(self, name: str) -> torch.dtype:
        reader, key = self._where[name]
        return reader.entries[key].dtype

    def read(self, name: str) -> torch.Tensor:
        reader, key = self._where[name]
        return reader.read(key)

    def read_slot(self, slot: Slot) -> torch.Tensor:
        """The weight a kohya name lands on (a row slice of a fused weight is cut out)."""
        weight = self.read(slot.weight)
        return weight if slot.rows is None else weight[slot.rows[0] : slot.rows[1]].clone()

    def close(self) -> None:
        for reader in self._readers:
            reader.close()
        self._readers.clear()

    def __enter__(self) -> ModelReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
