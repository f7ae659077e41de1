"""Expert-kernel test cases shared by the forward and backward tests: sizes no block divides, on purpose.

Each test file turns `routing` into expert ids its own way.
"""

from dataclasses import dataclass

import torch


@dataclass
class Case:
    name: str
    tokens: int
    experts: int
    top_k: int
    hidden: int = 80  # H and F are multiples of no block size the kernels use
    ffn: int = 48
    routing: str = "random"  # "random", "skewed" (the upper half of the experts gets no token) or "one"


CASES = [
    Case("T1_E16_k4", 1, 16, 4),
    Case("T37_E4_k2", 37, 4, 2),
    Case("T37_E16_k4", 37, 16, 4),
    Case("empty_experts", 37, 8, 2, routing="skewed"),
    Case("k1_one_expert", 37, 4, 1, routing="one"),
    Case("kE", 21, 4, 4),
    # Several M-, N- and K-tiles on one expert, all ragged: 150 rows, H and F past one 128-block.
    Case("multi_tile", 150, 3, 1, hidden=200, ffn=144, routing="one"),
]
CASE_IDS = [c.name for c in CASES]
BY_NAME = {c.name: c for c in CASES}

# (dtype, torch matmul precision, the GEMM class a launch must take, its FP32_DOT), as on a GPU: 16 bits on the
# tensor-core path, fp32 in full fp32 only at precision "highest", else TF32.
GEMM_CLASS_CASES = [
    (torch.bfloat16, "highest", "16bit", False),
    (torch.float16, "highest", "16bit", False),
    (torch.float32, "highest", "fp32_dot", True),
    (torch.float32, "high", "tf32", False),
]
GEMM_CLASS_IDS = ["bf16", "fp16", "fp32-ieee", "fp32-tf32"]
