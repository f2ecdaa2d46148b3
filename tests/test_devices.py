import pytest
import torch

from de3bert.devices import resolve_device, resolve_precision
from de3bert.errors import DeviceError

NO_CUDA = not torch.cuda.is_available()


def test_cpu_and_auto_without_a_gpu():
    assert resolve_device("cpu") == torch.device("cpu")
    if NO_CUDA:
        assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("BF16", torch.device("cpu")) == "bf16"


@pytest.mark.skipif(not NO_CUDA, reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_a_gpu_that_is_not_there_is_a_clear_error(name):
    with pytest.raises(DeviceError, match=f"device '{name}' is not available: this machine has no usable CUDA GPU"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "gpu"])
def test_unknown_devices_and_precisions_are_clear_errors(name):
    with pytest.raises(DeviceError, match=f"unknown device '{name}'"):
        resolve_device(name)
    with pytest.raises(DeviceError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", torch.device("cpu"))
