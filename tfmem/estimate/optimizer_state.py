"""The optimizer a fake step runs for the recipe's `optimizer`, with the state the real one keeps.

- adamw: `torch.optim.AdamW` itself (built in fake_step.py).
- adafactor: transformers' `Adafactor` itself, as the Trainer builds it: it is plain PyTorch, so it
  runs on fake tensors and its state (a row and a column vector per matrix, a full second moment for
  vectors, an RMS scalar per tensor) and its step's temporaries (full-size `grad**2` and update
  tensors, one parameter at a time) are the real ones.
- adamw-8bit: bitsandbytes' kernels read data (they cannot run on fake tensors), so `EightBitAdamWState`
  lays out the state exactly as bitsandbytes 0.45+ does (`Optimizer2State.init_state`) and updates it in
  place, as its fused kernel does (no full-size temporaries):
    * a tensor of >= 4096 elements (`min_8bit_size`): two uint8 moments (1 byte each per element) and two
      fp32 absmax vectors, one value per block of 256 elements;
    * a smaller tensor, or an `nn.Embedding` weight (the Trainer registers embeddings for 32-bit state,
      bitsandbytes' advice for stability): two fp32 moments, 8 bytes per element;
    * two 256-entry fp32 quantile maps shared by the whole optimizer.

`state_bytes` gives the same count by arithmetic, for tables and tests.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tfmem.techniques.optimizer import MIN_8BIT_SIZE

BLOCK_SIZE = 256  # bitsandbytes' blockwise quantization of optimizer state (0.45+)
QMAP_ENTRIES = 256


class EightBitAdamWState(torch.optim.Optimizer):
    """Stand-in for bitsandbytes' 8-bit AdamW in a fake step: its state layout, no arithmetic.

    Args:
        params: the trainable parameters.
        embedding_weights: parameters kept in 32-bit as the Trainer registers them (nn.Embedding weights).
    """

    def __init__(self, params: list[nn.Parameter], embedding_weights: set[int] | None = None) -> None:
        super().__init__(params, {"lr": 0.0})
        self.thirty_two_bit = embedding_weights or set()
        self.qmaps: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                state["step"] += 1
                # The fused kernel updates the moments and the weight in place: nothing new is allocated.
                state["state1"].add_(0)
        return None

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        state["step"] = 0
        if p.numel() < MIN_8BIT_SIZE or id(p) in self.thirty_two_bit:
            state["state1"] = torch.zeros_like(p, dtype=torch.float32)
            state["state2"] = torch.zeros_like(p, dtype=torch.float32)
            return
        if self.qmaps is None:
            self.qmaps = (torch.zeros(QMAP_ENTRIES, device=p.device), torch.zeros(QMAP_ENTRIES, device=p.device))
        blocks = math.ceil(p.numel() / BLOCK_SIZE)
        state["state1"] = torch.zeros_like(p, dtype=torch.uint8)
        state["state2"] = torch.zeros_like(p, dtype=torch.uint8)
        state["qmap1"], state["qmap2"] = self.qmaps
        state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)


def fake_optimizer(name: str, model: nn.Module, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer for `name` ("adamw-8bit" or "adafactor") over `params`, to run on fake tensors."""
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-5, scale_parameter=False, relative_step=False)
    if name == "adamw-8bit":
        return EightBitAdamWState(params, embedding_weights=embedding_weight_ids(model))
    raise ValueError(f"no fake optimizer for {name!r}; adamw is built in fake_step.py.")


def embedding_weight_ids(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def state_bytes(name: str, model: nn.Module) -> int:
    """Bytes of optimizer state `name` keeps for `model`'s trainable parameters (fp32 parameters).

    Example:
        >>> net = nn.Linear(128, 64)   # an 8192-element weight and a 64-element bias
        >>> state_bytes("adamw", net), state_bytes("adamw-8bit", net), state_bytes("adafactor", net)
        (66048, 19200, 1032)
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return sum(8 * p.numel() for p in params)
    if name == "adafactor":
        # exp_avg_sq_row + exp_avg_sq_col for matrices (factored), exp_avg_sq for vectors; an RMS scalar each.
        return sum(4 * (math.prod(p.shape[:-1]) + math.prod(p.shape[:-2]) * p.shape[-1] if p.dim() >= 2 else p.numel())
                   + 4 for p in params)
    if name == "adamw-8bit":
        embeddings = embedding_weight_ids(model)
        total, quantized = 0, False
        for p in params:
            if p.numel() < MIN_8BIT_SIZE or id(p) in embeddings:
                total += 8 * p.numel()
            else:
                total += 2 * p.numel() + 2 * 4 * math.ceil(p.numel() / BLOCK_SIZE)
                quantized = True
        return total + (2 * 4 * QMAP_ENTRIES if quantized else 0)
    raise ValueError(f"unknown optimizer {name!r}")
