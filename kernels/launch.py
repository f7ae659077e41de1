"""One way to launch a kernel: on the device of its tensors, through `torch.library.wrap_triton`.

Triton launches on the *current* CUDA device, which is not the tensors' device on a model spread over several GPUs
(`device_map="auto"`): every launcher goes through `launch`, which makes the tensors' device current for the launch.
`wrap_triton` keeps the launch traceable by torch.compile inside a `torch.library.triton_op`.
"""

import contextlib

import torch


def device_guard(device: torch.device):
    """A context in which `device` is the current CUDA device (nothing to do off CUDA)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid, *args, **meta) -> None:
    """kernel[grid](*args, **meta) on the device of the first tensor argument (a launcher's tensors share one device:
    it checks that before it allocates)."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    with device_guard(device):
        torch.library.wrap_triton(kernel)[grid](*args, **meta)
