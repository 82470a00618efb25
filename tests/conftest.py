import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting slows 2-core CI 10-40x

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
