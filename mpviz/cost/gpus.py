"""The GPUs an estimate can be made for: datasheet peaks, memory bandwidth and size (no torch).

Tensor-core figures are *dense*: NVIDIA's datasheets list them "with sparsity" (2:4 structured
sparsity, which training does not use); those are halved here, as torchao's roofline does.
fp16/bf16/fp8 figures are the ones with fp32 accumulation, which PyTorch's matmuls use (GeForce
cards run fp16 accumulation twice as fast; PyTorch does not use it).

Two numbers are not datasheet figures but torchao's (``torchao/testing/training/roofline_utils.py``
in pytorch/ao): the share of the peak a large GEMM reaches (0.78) and of the bandwidth a large
elementwise kernel reaches (0.92), both measured by torchao on an H100 and used there for other
GPUs until measured; and the 2 µs floor per kernel (torchao's measurement of a one-element kernel
on an H100). Eager PyTorch also spends a few µs of host time per op, which a fast GPU may not hide
on small models.

    >>> get_device("H100").peak("bf16")
    989500000000000.0
    >>> sorted(devices()["name"])[:3]
    ['a100', 'h100', 'h200']
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

from mpviz.formats import did_you_mean

if TYPE_CHECKING:  # pandas is imported by devices() only
    import pandas as pd

__all__ = ["Device", "DEVICES", "COST_PRECISIONS", "get_device", "devices"]

# The precisions a cost is given for: mpviz's (formats.PRECISIONS; both fp8 formats run on the same
# tensor cores) plus tf32, fp32 storage whose matmuls run on tensor cores
# (torch.backends.cuda.matmul.allow_tf32 = True).
COST_PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16", "fp8")


@dataclass(frozen=True)
class Device:
    """One GPU: dense peak TFLOP/s per precision, memory bandwidth (GB/s) and size (GB).

    ``peak_tflops`` has no ``fp8`` key where the GPU has no fp8 tensor cores.
    """

    name: str
    title: str
    peak_tflops: Mapping[str, float]
    bandwidth_gbs: float
    memory_gb: float
    source: str
    launch_us: float = 2.0             # torchao's floor per kernel
    matmul_efficiency: float = 0.78    # torchao: share of the peak a large GEMM reaches
    memory_efficiency: float = 0.92    # torchao: share of the bandwidth a large kernel reaches
    aliases: tuple[str, ...] = field(default=(), repr=False)

    def peak(self, precision: str) -> float:
        """Dense peak FLOP/s at ``precision`` (one of :data:`COST_PRECISIONS`)."""
        if precision not in self.peak_tflops:
            has = ", ".join(self.peak_tflops)
            raise ValueError(f"The {self.title} has no {precision} peak (it has {has}); "
                             f"{precision} training needs a GPU that has, e.g. "
                             f"{', '.join(d for d in DEVICES if precision in DEVICES[d].peak_tflops)}.")
        return self.peak_tflops[precision] * 1e12

    @property
    def bandwidth(self) -> float:
        """Bytes per second."""
        return self.bandwidth_gbs * 1e9

    @property
    def memory_bytes(self) -> float:
        """The datasheet's GB as 10**9 bytes: a little under what the card has, as the CUDA
        context and the allocator take some of it."""
        return self.memory_gb * 1e9


DEVICES: dict[str, Device] = {d.name: d for d in (
    Device(
        "a100", "NVIDIA A100 SXM 80GB",
        {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
        bandwidth_gbs=2039.0, memory_gb=80.0,
        source="NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM column "
               "(tensor-core figures without sparsity as listed)",
        aliases=("a100 80gb", "a100 sxm", "a100 sxm4 80gb"),
    ),
    Device(
        "h100", "NVIDIA H100 SXM 80GB",
        {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5, "fp8": 1979.0},
        bandwidth_gbs=3350.0, memory_gb=80.0,
        source="NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column "
               "(tensor-core figures listed with sparsity, halved)",
        aliases=("h100 sxm", "h100 80gb hbm3", "h100 sxm5"),
    ),
    Device(
        "h200", "NVIDIA H200 SXM 141GB",
        {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5, "fp8": 1979.0},
        bandwidth_gbs=4800.0, memory_gb=141.0,
        source="NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column "
               "(tensor-core figures listed with sparsity, halved)",
        aliases=("h200 sxm",),
    ),
    Device(
        "l4", "NVIDIA L4 24GB",
        {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0, "fp8": 242.5},
        bandwidth_gbs=300.0, memory_gb=24.0,
        source="NVIDIA L4 Tensor Core GPU datasheet (tensor-core figures listed with sparsity, halved)",
    ),
    Device(
        "l40s", "NVIDIA L40S 48GB",
        {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05, "fp8": 733.0},
        bandwidth_gbs=864.0, memory_gb=48.0,
        source="NVIDIA L40S datasheet (dense tensor-core figures as listed)",
    ),
    Device(
        "rtx4090", "NVIDIA GeForce RTX 4090 24GB",
        {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2, "fp8": 330.3},
        bandwidth_gbs=1008.0, memory_gb=24.0,
        source="NVIDIA Ada GPU Architecture whitepaper, appendix table for the GeForce RTX 4090 "
               "(dense, fp32-accumulate tensor-core figures)",
        aliases=("4090", "rtx 4090", "geforce rtx 4090"),
    ),
)}


def _key(name: str) -> str:
    # "NVIDIA H100 80GB HBM3" (torch.cuda.get_device_name) and "h100-sxm" name the same GPU.
    return re.sub(r"[\s_\-]+", " ", name.lower().replace("nvidia", "").replace("geforce", "")).strip()


_LOOKUP = {_key(a): d for d in DEVICES.values() for a in (d.name, d.title, *d.aliases)}


def get_device(name: str | Device) -> Device:
    """The :class:`Device` called ``name`` (``"h100"``, ``"A100"``, ``torch.cuda.get_device_name()``).

    Raises ValueError listing the known GPUs.
    """
    if isinstance(name, Device):
        return name
    found = _LOOKUP.get(_key(str(name))) or _LOOKUP.get(_key(str(name)).replace(" ", ""))
    if found is None:
        close = did_you_mean(str(name).lower(), list(DEVICES))
        raise ValueError(f"Unknown device {name!r}{f' ({close})' if close else ''}. "
                         f"Known GPUs: {', '.join(DEVICES)} (see mpviz.devices()).")
    return found


def devices() -> "pd.DataFrame":
    """The known GPUs, one row each: dense peak TFLOP/s per precision (NaN where the GPU has
    none), bandwidth (GB/s), memory (GB), the floor per kernel (µs) and the datasheet.

        >>> import mpviz
        >>> float(mpviz.devices().set_index("name").loc["h100", "bf16"])
        989.5
    """
    import pandas as pd

    rows = [{"name": d.name, "title": d.title,
             **{p: d.peak_tflops.get(p, math.nan) for p in COST_PRECISIONS},
             "bandwidth_gbs": d.bandwidth_gbs, "memory_gb": d.memory_gb, "launch_us": d.launch_us,
             "source": d.source} for d in DEVICES.values()]
    return pd.DataFrame(rows)
