"""Which keys each query sees, in the compact form the attention kernels read (no [Nq, Nk] mask in memory).

DBRX attention is always causal. Query i of batch row b (0 <= i < Nq) attends to key j (0 <= j < Nk) when all hold:
  - causal:  j <= i + q_offset[b]           (q_offset = Nk - Nq is bottom-right alignment; a static cache's
                                             q_offset is the number of tokens already cached, whatever Nk is)
  - padding: key_mask is None or key_mask[b, j]
  - packing: key_start is None or j >= key_start[b, i]   (the first key of query i's packed sequence)
A query with no allowed key gets output 0 (and log-sum-exp -inf).

q_offset lives on the device, so a CUDA graph replayed at another decode step reads the new value.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMask:
    q_offset: torch.Tensor  # int32 [B]
    key_mask: torch.Tensor | None = None  # bool [B, Nk]
    key_start: torch.Tensor | None = None  # int32 [B, Nq]

    @staticmethod
    def bottom_right(batch: int, num_queries: int, num_keys: int, device) -> "AttentionMask":
        """Plain causal attention of the last `num_queries` positions of `num_keys`."""
        return AttentionMask(torch.full((batch,), num_keys - num_queries, dtype=torch.int32, device=device))

    def check(self, batch: int, num_queries: int, num_keys: int, device: torch.device) -> None:
        """ValueError naming the field whose shape, dtype or device does not fit the attention call."""
        expected = {
            "q_offset": (self.q_offset, (batch,), (torch.int32,)),
            "key_mask": (self.key_mask, (batch, num_keys), (torch.bool,)),
            "key_start": (self.key_start, (batch, num_queries), (torch.int32,)),
        }
        for name, (t, shape, dtypes) in expected.items():
            if t is None:
                continue
            if tuple(t.shape) != shape or t.dtype not in dtypes or t.device != device:
                raise ValueError(
                    f"AttentionMask.{name}: {tuple(t.shape)} {t.dtype} on {t.device}, expected {shape} "
                    f"{dtypes[0]} on {device}"
                )

    def dense(self, num_queries: int, num_keys: int) -> torch.Tensor:
        """bool [B, Nq, Nk]: True where query i attends to key j (for the reference and the stock fallback)."""
        i = torch.arange(num_queries, device=self.q_offset.device)[:, None]
        j = torch.arange(num_keys, device=self.q_offset.device)[None, :]
        allowed = j[None] <= i[None] + self.q_offset[:, None, None]
        if self.key_mask is not None:
            allowed = allowed & self.key_mask[:, None, :]
        if self.key_start is not None:
            allowed = allowed & (j[None] >= self.key_start[:, :, None])
        return allowed
