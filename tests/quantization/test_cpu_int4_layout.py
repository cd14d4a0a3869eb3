import os
import subprocess
import sys

import pytest
import torch

from qalora_tune.quantization.cpu_int4_layout import (
    cpu_int4_layout,
    pack_cpu_int4,
    unpack_cpu_int4,
)


@pytest.mark.parametrize("n,k", [(16, 32), (48, 64), (64, 128), (96, 64), (112, 256), (176, 96), (1024, 64)])
def test_unpack_inverts_the_kernel_packing(n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    assert torch.equal(unpack_cpu_int4(pack_cpu_int4(codes), n, k).to(torch.int32), codes)


def test_layout_is_one_of_the_known_ones():
    assert cpu_int4_layout() in {(64, 4), (32, 2), (32, 1)}


def test_non_vectorized_build_layout_also_unpacks():
    # ATEN_CPU_CAPABILITY=default selects PyTorch's scalar kernels and their plain layout
    code = (
        "import torch\n"
        "from qalora_tune.quantization.cpu_int4_layout import *\n"
        "assert tuple(cpu_int4_layout()) == (32, 1), cpu_int4_layout()\n"
        "q = torch.randint(0, 16, (80, 64), dtype=torch.int32)\n"
        "assert torch.equal(unpack_cpu_int4(pack_cpu_int4(q), 80, 64).int(), q)\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
