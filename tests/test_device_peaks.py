"""The peak table behind MFU and the kernel benchmarks' roofline: names, precisions, overrides."""

import pytest
import torch

from pretrain.device_peaks import device_peak, lookup


@pytest.mark.parametrize("name,precision,entry,tflops,tbps", [
    ("NVIDIA H100 80GB HBM3", "bf16", "H100 SXM", 989.4, 3.35),
    ("NVIDIA H100 PCIe", "bf16", "H100 PCIe", 756.5, 2.0),
    ("NVIDIA H100 NVL", "fp16", "H100 NVL", 835.5, 3.9),
    ("NVIDIA H200", "bf16", "H200 SXM", 989.4, 4.8),
    ("NVIDIA H200", "fp32", "H200 SXM", 66.9, 4.8),
    ("NVIDIA A100-SXM4-80GB", "bf16", "A100 80GB SXM", 312.0, 2.039),
    ("NVIDIA A100-SXM4-40GB", "tf32", "A100 40GB SXM", 156.0, 1.555),
    ("NVIDIA A100 80GB PCIe", "bf16", "A100 80GB PCIe", 312.0, 1.935),
    ("NVIDIA A100-PCIE-40GB", "fp32", "A100 40GB PCIe", 19.5, 1.555),
    ("NVIDIA L40S", "bf16", "L40S", 362.05, 0.864),
    ("NVIDIA L4", "bf16", "L4", 121.0, 0.3),
    ("NVIDIA A10", "bf16", "A10", 125.0, 0.6),
])
def test_table_by_name_and_precision(name, precision, entry, tflops, tbps):
    found = lookup(name, precision)
    assert found == (entry, pytest.approx(tflops * 1e12), pytest.approx(tbps * 1e12))


def test_a100_memory_size_tells_80_from_40gb():
    assert lookup("NVIDIA A100-SXM4", "bf16", memory_bytes=80 * 2**30)[0] == "A100 80GB SXM"
    assert lookup("NVIDIA A100-SXM4", "bf16", memory_bytes=40 * 2**30)[0] == "A100 40GB SXM"


def test_unknown_devices_have_no_peak():
    assert lookup("NVIDIA GeForce GTX 1080", "bf16") is None
    assert lookup("NVIDIA A10G", "bf16") is None  # not an A10: different clocks
    peak = device_peak("cpu", "bf16")
    assert peak.flops is None and peak.roofline_s(1e12, 1e9) is None
    assert peak.source == "unknown device"
    with pytest.raises(ValueError, match="precision"):
        lookup("NVIDIA H100", "int8")


def test_overrides_win(monkeypatch):
    monkeypatch.setenv("SCPRETRAIN_PEAK_TFLOPS", "100")
    monkeypatch.setenv("SCPRETRAIN_PEAK_TBPS", "2")
    peak = device_peak("cpu", "fp32")
    assert (peak.flops, peak.bytes_per_s, peak.source) == (100e12, 2e12, "override")
    assert peak.roofline_s(50e12, 1e12) == pytest.approx(0.5)  # compute-bound: 0.5 s
    assert peak.roofline_s(1e12, 3e12) == pytest.approx(1.5)  # memory-bound: 1.5 s
    assert device_peak("cpu", "fp32", peak_tflops=7.0).flops == 7e12  # argument over env
    monkeypatch.setenv("SCPRETRAIN_PEAK_TFLOPS", "fast")
    with pytest.raises(ValueError, match="SCPRETRAIN_PEAK_TFLOPS='fast'"):
        device_peak("cpu")


def test_a_cuda_device_is_looked_up_by_its_reported_name(monkeypatch):
    props = type("Props", (), {"name": "NVIDIA H100 PCIe", "total_memory": 80 * 2**30})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    peak = device_peak("cuda:0", "bf16")
    assert peak.device == "NVIDIA H100 PCIe" and peak.source == "table: H100 PCIe"
    assert peak.flops == pytest.approx(756.5e12)
    monkeypatch.setenv("SCPRETRAIN_PEAK_TBPS", "1.5")
    peak = device_peak("cuda:0", "bf16")
    assert peak.bytes_per_s == 1.5e12 and peak.flops == pytest.approx(756.5e12)
    assert peak.source == "override (rest from table: H100 PCIe)"
