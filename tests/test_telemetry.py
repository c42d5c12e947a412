"""The one NVML reader (wmfast.telemetry) against a stand-in pynvml: it queries only the fields asked for, and the
training log and `wmfast env` read through it."""
import sys
import types

import torch


def _fake_pynvml(calls):
    def query(name, value):
        def f(*args):
            calls.append(name)
            return value
        return f

    nv = types.SimpleNamespace(NVML_CLOCK_SM=0, NVML_CLOCK_MEM=1, NVML_TEMPERATURE_GPU=0,
                               nvmlInit=lambda: None, nvmlShutdown=lambda: None,
                               nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}", nvmlDeviceGetCount=lambda: 1,
                               nvmlSystemGetDriverVersion=lambda: b"580.1",
                               nvmlDeviceGetName=lambda h: b"Test GPU",
                               nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=2**31, used=2**30))
    nv.nvmlDeviceGetUtilizationRates = query("util", types.SimpleNamespace(gpu=42))
    nv.nvmlDeviceGetClockInfo = query("clock", 1500)
    nv.nvmlDeviceGetPowerUsage = query("power", 300_000)
    nv.nvmlDeviceGetTemperature = query("temp", 55)
    return nv


def test_reader_queries_only_the_fields_asked_for(monkeypatch):
    from wmfast.telemetry import Nvml, driver_version, list_gpus

    calls = []
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(calls))
    reader, why = Nvml.open(0)
    assert reader is not None and why == ""
    assert reader.read(("gpu_util", "power_w", "temp_c")) == {"gpu_util": 42.0, "power_w": 300.0, "temp_c": 55.0}
    assert calls == ["util", "power", "temp"]
    assert driver_version() == "580.1"
    gpus, note = list_gpus()
    assert note == "NVML" and gpus == [{"index": 0, "name": "Test GPU", "memory_total_gib": 2.0,
                                        "memory_used_gib": 1.0, "driver": "580.1"}]


def test_training_log_reads_through_the_reader(monkeypatch):
    from wmfast.train.runlog import GpuTelemetry

    calls = []
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(calls))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert GpuTelemetry(torch.device("cuda", 0)).read() == {"gpu_util": 42.0, "gpu_power_w": 300.0, "gpu_temp_c": 55.0}
    assert "clock" not in calls
    assert GpuTelemetry(torch.device("cpu")).read() == {}


def test_no_nvml_says_why(monkeypatch):
    from wmfast.telemetry import Nvml, driver_version

    monkeypatch.setitem(sys.modules, "pynvml", None)
    reader, why = Nvml.open(0)
    assert reader is None and "nvidia-ml-py unusable" in why
    assert driver_version() == ""
