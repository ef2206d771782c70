import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Backend choices measured during the tests (GPU ops) and converted models go to a cache of
# this run, not the user's (prunepath.ops.autotune, prunepath.models). The process that makes
# the folder removes it at exit: a converted SmolLM2 is ~0.5 GB, and leaked folders once filled
# the disk. xdist workers inherit the variable from the controller and leave the folder alone.
if "PRUNEPATH_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="prunepath-test-cache-")
    os.environ["PRUNEPATH_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

# Triton kernels run on the CPU under the interpreter when there is no GPU (how CI tests
# them). Must be set before any @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker is its own process: one intra-op thread per worker avoids
# oversubscribing the cores (CI has 2 cores and runs `pytest -n 2`).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture
def scratch_path():
    """A folder that is removed when the test ends, for large files such as a real model's
    checkpoint (pytest keeps ``tmp_path`` folders of the last three runs). It lies in the test
    cache folder, which is removed at exit even if the test process is interrupted."""
    path = Path(tempfile.mkdtemp(prefix="scratch-", dir=os.environ["PRUNEPATH_CACHE_DIR"]))
    yield path
    shutil.rmtree(path, ignore_errors=True)
