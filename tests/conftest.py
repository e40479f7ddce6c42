import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")      # nothing is ever downloaded, by the product or the tests


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def exact_attention():
    """Run SDPA with PyTorch's reference kernel (matmul, softmax, matmul: HF's eager attention, op for op).

    The default CPU kernel is blocked flash attention: the same maths summed in another order, which alone
    moves these wide-init fp32 logits by up to ~1e-5. Under this kernel ours equals HF eager bitwise, which
    isolates our code from the kernel choice. Generation tests run on the default kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        yield
