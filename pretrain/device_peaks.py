"""Peak arithmetic rate and memory bandwidth of the device a run is on: the denominators of MFU
(the trainer) and of "% of roofline" (the kernel benchmarks), so both report against one table.

Figures are the vendors' datasheet values for dense math (no 2:4 sparsity), per GPU:
``bf16``/``fp16`` and ``tf32`` on tensor cores, ``fp32`` on the plain FP32 units (what an
fp32 run uses when TF32 is off, and what the kernels' exact "ieee" dots use). The name is matched
against ``torch.cuda.get_device_name()``; parts sold in two memory sizes with different
bandwidths (A100 40/80 GB) are told apart by the name, else by the memory the device reports.

An override always wins: ``SCPRETRAIN_PEAK_TFLOPS`` and ``SCPRETRAIN_PEAK_TBPS`` in the
environment, or the ``peak_tflops`` / ``peak_tbps`` arguments (the trainer's ``--peak-tflops``).
An unknown device without an override has no peak: MFU and roofline percentages are then left
out rather than computed against a guess.

``native_bf16`` tells whether a device multiplies bf16 natively: what precision "auto" of the
trainer and of ``pretrain.embed`` turns into bf16.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

PRECISIONS = ("bf16", "fp16", "tf32", "fp32")


@dataclass(frozen=True)
class DevicePeak:
    """One device at one precision: peak FLOP/s and bytes/s, and where the figures came from."""

    device: str
    precision: str
    flops: float | None  # FLOP/s
    bytes_per_s: float | None
    source: str  # "table: <entry>", "override", or "unknown device"

    def roofline_s(self, flops: float, nbytes: float) -> float | None:
        """The least time the work can take: the slower of compute and memory traffic."""
        if not self.flops or not self.bytes_per_s:
            return None
        return max(flops / self.flops, nbytes / self.bytes_per_s)

    def as_dict(self) -> dict:
        return {"device": self.device, "precision": self.precision,
                "peak_tflops": self.flops / 1e12 if self.flops else None,
                "peak_tbps": self.bytes_per_s / 1e12 if self.bytes_per_s else None,
                "source": self.source}


# (entry, name pattern, {precision: TFLOP/s}, TB/s); the first pattern that matches wins, so
# the more specific names come first. fp16 has the bf16 rate on every part listed.
_TABLE: list[tuple[str, str, dict[str, float], float]] = [
    ("H200 NVL", r"H200.*NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}, 4.8),
    ("H200 SXM", r"H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}, 4.8),
    ("GH200", r"GH200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}, 4.0),
    ("H100 NVL", r"H100.*NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}, 3.9),
    ("H100 PCIe", r"H100.*PCIe", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2}, 2.0),
    ("H100 SXM", r"H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}, 3.35),
    ("H800 SXM", r"H800", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}, 3.35),
    ("A100 80GB PCIe", r"A100.*80GB.*PCIe|A100.*PCIE.*80GB",
     {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}, 1.935),
    ("A100 80GB SXM", r"A100.*SXM.*80GB|A100.*80GB",
     {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}, 2.039),
    ("A100 40GB PCIe", r"A100.*PCIE|A100.*PCIe",
     {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}, 1.555),
    ("A100 40GB SXM", r"A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}, 1.555),
    ("A800", r"A800", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}, 2.039),
    ("L40S", r"L40S", {"bf16": 362.05, "tf32": 183.0, "fp32": 91.6}, 0.864),
    ("L40", r"L40", {"bf16": 181.0, "tf32": 90.5, "fp32": 90.5}, 0.864),
    ("L4", r"\bL4\b", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}, 0.300),
    ("A10", r"\bA10\b", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}, 0.600),
    ("A40", r"\bA40\b", {"bf16": 149.7, "tf32": 74.8, "fp32": 37.4}, 0.696),
    ("RTX A6000", r"RTX A6000", {"bf16": 154.8, "tf32": 77.4, "fp32": 38.7}, 0.768),
    ("B200", r"B200", {"bf16": 2250.0, "tf32": 1100.0, "fp32": 80.0}, 8.0),
]


def lookup(name: str, precision: str = "bf16",
           memory_bytes: int | None = None) -> tuple[str, float, float] | None:
    """(table entry, FLOP/s, bytes/s) of a device name at a precision, or None if unknown.

    ``memory_bytes`` (what the device reports) tells an A100 80 GB from a 40 GB one when the
    name does not (some drivers name both "A100-SXM4").
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    if memory_bytes and memory_bytes > 60 * 2**30 and "A100" in name and "80GB" not in name:
        name = f"{name} 80GB"
    for entry, pattern, rates, tbps in _TABLE:
        if re.search(pattern, name, flags=re.IGNORECASE):
            tflops = rates["bf16" if precision == "fp16" else precision]
            return entry, tflops * 1e12, tbps * 1e12
    return None


def _float_env(name: str) -> float | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected a number") from None
    if number <= 0:
        raise ValueError(f"{name}={value!r}: expected a positive number")
    return number


def device_peak(device: torch.device | str | None = None, precision: str = "bf16",
                peak_tflops: float | None = None, peak_tbps: float | None = None) -> DevicePeak:
    """The peaks of ``device`` (default: the current CUDA device) at ``precision``.

    Explicit arguments win over ``SCPRETRAIN_PEAK_TFLOPS`` / ``SCPRETRAIN_PEAK_TBPS``, which win
    over the table. A CPU device has no table entry: without an override its peaks are None.
    """
    peak_tflops = peak_tflops or _float_env("SCPRETRAIN_PEAK_TFLOPS")
    peak_tbps = peak_tbps or _float_env("SCPRETRAIN_PEAK_TBPS")
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    name, memory = "cpu", None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, memory = props.name, props.total_memory
    found = lookup(name, precision, memory)
    flops = peak_tflops * 1e12 if peak_tflops else (found[1] if found else None)
    nbytes = peak_tbps * 1e12 if peak_tbps else (found[2] if found else None)
    if peak_tflops or peak_tbps:
        source = "override" + (f" (rest from table: {found[0]})" if found and not (
            peak_tflops and peak_tbps) else "")
    else:
        source = f"table: {found[0]}" if found else "unknown device"
    return DevicePeak(name, precision, flops, nbytes, source)


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 natively, what precision "auto" (trainer and
    ``pretrain.embed``) takes bf16 on: a CUDA device of compute capability 8.0 (Ampere) or newer,
    or a CPU that oneDNN runs bf16 on (AVX-512 BW/VL/DQ or newer; torch's own test). Elsewhere
    bf16 is emulated and slower than fp32 (5x in training on an AVX2-only CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
