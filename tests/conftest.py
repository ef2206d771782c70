import os
import tempfile

import torch

# backend choices measured during the tests (GPU ops) go to a cache of this
# run, not the user's (prunepath.ops.autotune)
os.environ.setdefault("PRUNEPATH_CACHE_DIR", tempfile.mkdtemp(prefix="prunepath-test-cache-"))

# Triton kernels run on the CPU under the interpreter when there is no GPU (how CI tests
# them). Must be set before any @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker is its own process: one intra-op thread per worker avoids
# oversubscribing the cores (CI has 2 cores and runs `pytest -n 2`).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
