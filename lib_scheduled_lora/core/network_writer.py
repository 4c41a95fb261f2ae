"""Writing a made network as a kohya-format ``.safetensors`` file, with metadata saying how it was made.

Keys are kohya's (``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``; norm layers
``.w_norm`` / ``.b_norm``), which the WebUI's own Lora, diffusers' ``load_lora_weights`` and this
package read. Metadata: kohya's ``ss_network_module`` / ``ss_network_dim`` / ``ss_network_alpha``
/ ``ss_base_model_version`` (so that trainers' tools and the base-model guess recognise the file)
and ``scheduled_lora_made``: JSON with the operation, every source file with its sha256 and
strength, and the rank rule. Written atomically
(:func:`~lib_scheduled_lora.core.networks.files.write_safetensors_atomic`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lib_scheduled_lora.core.lowrank import RankRule
from lib_scheduled_lora.core.network_merge import MergedNetwork
from lib_scheduled_lora.core.networks.files import write_safetensors_atomic

METADATA_KEY = "scheduled_lora_made"
TOOL = "sd-webui-scheduled-lora"  # callers add the version (the core does not import the package root)
# kohya's ss_base_model_version for each family this package tells apart
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
NETWORK_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class SourceRecord:
    """One input of a made network: its file name, content hash and strength (None: a model)."""

    file: str
    sha256: str
    strength: float | None = None
    role: str = "network"  # "network", "base", "tuned"


def file_sha256(path: str | os.PathLike, chunk: int = 2**22, cancel: Callable[[], None] | None = None) -> str:
    """The sha256 of a file's bytes (as the WebUI shows network hashes), read in chunks;
    ``cancel()`` is called between chunks and may raise."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
            if cancel is not None:
                cancel()
    return digest.hexdigest()


def source_records(pairs: Sequence[tuple[str, float | None, str]]) -> list[SourceRecord]:
    """``(path, strength, role)`` -> records with each file's sha256."""
    return [SourceRecord(Path(path).name, file_sha256(path), strength, role) for path, strength, role in pairs]


def made_metadata(
    operation: str,
    merged: MergedNetwork,
    sources: Sequence[SourceRecord],
    *,
    family: str | None = None,
    extra: dict | None = None,
    tool: str = TOOL,
) -> dict[str, str]:
    """The metadata of a network made by ``operation`` ("merge-networks", "resize", "extract");
    ``tool`` names the program and its version."""
    ranks = sorted(set(merged.ranks))
    dim = str(ranks[0]) if len(ranks) == 1 else "Dynamic"
    made = {
        "operation": operation,
        "tool": tool,
        "sources": [asdict(s) for s in sources],
        "rank_rule": json.loads(merged.rule.to_json()) if merged.rule is not None else "exact (concatenated ranks)",
        "exact": merged.exact,
        "layers": len(merged.layers),
        "mean_fro_kept": round(merged.mean_fro_kept(), 6),
        **(extra or {}),
    }
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": str(common_rank(merged.ranks) or ""),
        METADATA_KEY: json.dumps(made, sort_keys=True),
    }
    if family in BASE_MODEL_VERSIONS:
        metadata["ss_base_model_version"] = BASE_MODEL_VERSIONS[family]
    return metadata


def describe_rule(rule: RankRule | None) -> str:
    return rule.describe() if rule is not None else "exact"


def write_network(
    merged: MergedNetwork,
    path: str | os.PathLike,
    metadata: dict[str, str],
    *,
    dtype: torch.dtype = torch.float16,
    force: bool = False,
) -> Path:
    """Write ``merged``'s tensors in ``dtype`` with one alpha for the whole file (float32, as
    kohya writes it; see :func:`one_alpha`)."""
    tensors = {key: value.to(dtype) for key, value in one_alpha(merged.tensors).items()}
    tensors.update({key: value.float() for key, value in tensors.items() if key.endswith(".alpha")})
    write_safetensors_atomic(tensors, path, metadata, force=force)
    return Path(path)


def common_rank(ranks: Sequence[int]) -> int | None:
    """The most common rank (the larger one on a tie): the file's one alpha."""
    counts: dict[int, int] = {}
    for rank in ranks:
        counts[rank] = counts.get(rank, 0) + 1
    return max(counts, key=lambda r: (counts[r], r)) if counts else None


def one_alpha(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same layers with every ``alpha`` equal to the most common rank, ΔW unchanged.

    Made networks hold their strengths in the factors (alpha = rank, scale 1), but ranks vary per
    layer, and diffusers' kohya loader keeps only the file's most common alpha for SD 1.x
    attention layers (its per-layer ``alpha_pattern`` does not match them), which would scale
    those layers by (common alpha) / rank. With one alpha α in the file that reading is right:
    a layer of rank r gets ``down · r/α``, so that (α/r)·up·down' = up·down.
    """
    ranks = {key[: -len(".lora_down.weight")]: t.shape[0] for key, t in tensors.items() if key.endswith(".lora_down.weight")}
    if not ranks:
        return dict(tensors)
    alpha = common_rank(list(ranks.values()))
    assert alpha is not None
    out = dict(tensors)
    for layer, rank in ranks.items():
        old_alpha = float(tensors.get(f"{layer}.alpha", torch.tensor(float(rank))))
        factor = old_alpha / alpha  # (old_alpha/r)·up·down = (alpha/r)·up·(down·factor)
        if factor != 1.0:
            out[f"{layer}.lora_down.weight"] = tensors[f"{layer}.lora_down.weight"] * factor
        out[f"{layer}.alpha"] = torch.tensor(float(alpha))
    return out


BAKED_KEY = "scheduled_lora_baked"


def baked_metadata(sources: Sequence[SourceRecord], *, dtype: str = "keep", tool: str = TOOL) -> dict[str, str]:
    """The metadata a baked checkpoint gets (beside its own): the networks, their hashes and strengths."""
    baked = {
        "tool": tool,
        "networks": [asdict(s) for s in sources],
        "dtype": dtype,
    }
    return {BAKED_KEY: json.dumps(baked, sort_keys=True)}
