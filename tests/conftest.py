import os

import torch

# Triton kernels run on the CPU under the interpreter when there is no GPU (how CI tests
# them). Must be set before any @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
