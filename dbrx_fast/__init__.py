"""dbrx-fast: Triton kernels for Hugging Face's DbrxForCausalLM, swapped in with one call.

import dbrx_fast
dbrx_fast.patch(model)      # in place; same parameters and state_dict keys
dbrx_fast.warmup(model, max_tokens=64)  # before capturing decode steps in a CUDA graph
dbrx_fast.unpatch(model)    # back to stock
"""

from .patch import is_patched, patch, unpatch
from .warmup import warmup

__all__ = ["patch", "unpatch", "is_patched", "warmup"]
__version__ = "0.1.0"
