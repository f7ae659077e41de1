"""What a kernel specialises on: sizes that change every call (tokens, rows, sequence length) must not compile a new
variant each. Triton specialises integer arguments on == 1 and on divisibility by 16 unless they are named in
`do_not_specialize`, and it ignores a name there that the kernel does not have."""

import inspect

import torch
from triton.runtime.autotuner import Autotuner


def _jit(kernel):
    """The jit function itself: an autotuner's .fn (a jit function's own .fn is the Python function)."""
    return kernel.fn if isinstance(kernel, Autotuner) else kernel


def unspecialised(kernel) -> set[str]:
    """The argument names `kernel` (a @triton.jit function or an autotuner over one) does not specialise on; raises
    if one of them is not an argument of the kernel."""
    fn = _jit(kernel)
    # A JITFunction keeps the list; an InterpretedFunction (TRITON_INTERPRET=1) keeps the jit keyword arguments.
    names = set(fn.do_not_specialize if hasattr(fn, "do_not_specialize") else fn.kwargs["do_not_specialize"] or [])
    unknown = names - set(inspect.signature(fn.fn).parameters)
    assert not unknown, f"do_not_specialize names arguments {fn.fn.__name__} does not have: {sorted(unknown)}"
    return names


def compiled_variants(kernel) -> int:
    """How many variants of `kernel` the JIT has compiled for the current CUDA device (Triton 3.6 to 3.9 keep them in
    device_caches[device][0])."""
    return len(_jit(kernel).device_caches[torch.cuda.current_device()][0])
