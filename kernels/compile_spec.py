"""What the compile-for-GPU check needs to know about one kernel launch: its signature and meta-parameters.

Every kernel module exposes `compile_specs() -> list[CompileSpec]` with one entry per (dtype, autotune config) it can
launch with; kernels/registry.py lists those modules. The check compiles each spec for sm_80 and sm_90 with
`triton.compile`, without a GPU.
"""

from dataclasses import dataclass, field

import triton


@dataclass(frozen=True)
class CompileSpec:
    name: str  # readable label, e.g. "layernorm_fwd bf16 BLOCK_N=8192"
    kernel: object  # the @triton.jit function (not the autotuner wrapping it)
    signature: dict[str, str]  # every runtime argument -> Triton type string: "*bf16", "*fp32", "i32", "i64", "fp32"
    constexprs: dict[str, object] = field(default_factory=dict)  # every tl.constexpr argument -> its value
    num_warps: int = 4
    num_stages: int = 3
    matrix: bool = False  # a tl.dot kernel: its sm_90 PTX must use wgmma
    archs: tuple[int, ...] = (80, 90)  # where a launcher takes this launch (a TMA path: sm_90 only)


def describe(cfg: triton.Config) -> str:
    """An autotune config as it appears in a compile spec's name: its meta-parameters, warps and stages."""
    meta = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{meta} warps={cfg.num_warps} stages={cfg.num_stages}"


def config_spec(label: str, kernel, signature: dict[str, str], meta: dict, cfg: triton.Config, **fields) -> CompileSpec:
    """The spec of `kernel` launched with the fixed constexprs `meta` and autotune config `cfg`, named
    `label` and the config; `fields` are CompileSpec's others (matrix, archs)."""
    return CompileSpec(
        name=f"{label} {describe(cfg)}",
        kernel=kernel,
        signature=signature,
        constexprs={**meta, **cfg.kwargs},
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **fields,
    )
