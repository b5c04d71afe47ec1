import os

import torch

os.environ.setdefault("VIDITQ_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without CUDA, Triton kernels are tested in the CPU interpreter; the flag must be set before triton is imported
# anywhere (diffusers may import it), and the interpreter needs a NumPy >= 2.4 work-around.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from viditq.kernels.triton_compat import patch_interpreter

        patch_interpreter()
    except ImportError:  # triton not installed: kernel tests skip themselves
        pass

torch.set_num_threads(min(2, torch.get_num_threads()))
