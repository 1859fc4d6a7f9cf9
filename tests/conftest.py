"""Test setup. TRITON_INTERPRET must be set before anything imports triton, so it is decided here from
the environment alone: on a machine without an NVIDIA device the Triton kernels run in the interpreter
on CPU tensors. LISA_FUSED_TEST_DEVICE=cuda|cpu overrides the device the device-generic tests use."""
import os

_has_gpu = os.path.exists("/dev/nvidia0") or os.environ.get("LISA_FUSED_TEST_DEVICE") == "cuda"
if not _has_gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TEST_DEVICE = os.environ.get("LISA_FUSED_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return torch.device(TEST_DEVICE)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped where none is present")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a 2-core CPU")
    config.addinivalue_line("markers", "distributed: launches its own 2-process group")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none present); runs in benchmarks/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
