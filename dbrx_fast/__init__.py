"""dbrx-fast: Triton kernels for Hugging Face's DbrxForCausalLM, swapped in with one call.

import dbrx_fast
dbrx_fast.patch(model)      # in place; same parameters and state_dict keys
dbrx_fast.unpatch(model)    # back to stock
"""

from .patch import is_patched, patch, unpatch

__all__ = ["patch", "unpatch", "is_patched"]
__version__ = "0.1.0"
