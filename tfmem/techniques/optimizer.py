"""Optimizer choice: how much state the optimizer keeps per trainable parameter.

AdamW keeps two fp32 moments, 8 bytes per trainable parameter: as much as the fp32 weights and their
gradients together. The lighter choices trade some of what is learned for that memory:

- ``adamw-8bit``: bitsandbytes' 8-bit AdamW. Both moments are stored as uint8 codes with one fp32
  scale (absmax) per block of 256 values: about 2 bytes per parameter. Tensors under 4096 elements
  (biases, LayerNorm weights) stay in 32-bit; they are few. The Trainer also keeps every `nn.Embedding`
  weight's state in 32-bit (bitsandbytes' advice for stability; bert-base's embeddings are a fifth of its
  parameters), and `build_optimizer` does the same when given the model. Needs the optional extra
  ``pip install tfmem[8bit]`` and a device bitsandbytes has kernels for (CUDA; recent versions also CPU).
- ``adafactor``: transformers' Adafactor as the Trainer builds it (fixed learning rate,
  ``scale_parameter=False, relative_step=False``). No first moment, and the second moment of a matrix
  is factored into one row and one column vector: a few bytes per *row* instead of per parameter.

Both change the update, and with it what is learned: the learning benchmark (benchmarks/learning.py)
says by how much on a small task. That is why the planner tries them only when asked
(``--allow-optimizer``).
"""

from __future__ import annotations

import difflib
import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from tfmem.errors import RecipeError
from tfmem.techniques._fields import quote, type_problem

logger = logging.getLogger(__name__)

NAMES = ("adamw", "adamw-8bit", "adafactor")

# The Trainer's own `optim` values for each choice. The first is what the recipe sets; the others are
# accepted when the user already set them (aliases of the same optimizer). For `adamw` the recipe sets
# nothing: the Trainer's default (fused AdamW where torch has it) is today's behaviour.
TRAINER_OPTIM = {
    "adamw": ("adamw_torch", "adamw_torch_fused"),
    "adamw-8bit": ("adamw_bnb_8bit", "adamw_8bit"),
    "adafactor": ("adafactor",),
}
# What TrainingArguments picks when `optim` is not given: an `optim` among these leaves the choice to the recipe.
TRAINER_DEFAULT_OPTIM = ("adamw_torch", "adamw_torch_fused")

EXTRA = "pip install tfmem[8bit]"
# bitsandbytes keeps tensors smaller than this in 32-bit (its `min_8bit_size` default).
MIN_8BIT_SIZE = 4096


@dataclass(frozen=True)
class OptimizerConfig:
    """Which optimizer trains the model.

    Args:
        name: "adamw" (default: two fp32 moments), "adamw-8bit" (bitsandbytes, 8-bit moments) or
            "adafactor" (factored second moment, no first moment).
    """

    name: str = "adamw"

    def problems(self) -> list[str]:
        problem = type_problem("optimizer", self.name, str, "optimizer: adamw-8bit")
        if problem:
            return [problem]
        if self.name not in NAMES:
            # Compare without separators too: `adamw8bit` and `adamw_8bit` both mean adamw-8bit.
            squashed = {n.replace("-", ""): n for n in NAMES}
            key = self.name[:100].lower().replace("-", "").replace("_", "")
            close = [squashed[key]] if key in squashed else difflib.get_close_matches(key, [n.replace("-", "") for n in NAMES], n=1)
            close = [squashed.get(c, c) for c in close]
            hint = f" Did you mean `{close[0]}`?" if close else ""
            return [f"`optimizer` must be one of {', '.join(NAMES)}; got {quote(self.name)}.{hint}"]
        return []

    def __post_init__(self) -> None:
        if problems := self.problems():
            raise RecipeError(problems)

    @property
    def changes_learning(self) -> bool:
        """True for the optimizers whose update differs from AdamW's."""
        return self.name != "adamw"


def optimizer_problems(config: OptimizerConfig, device: torch.device | str) -> list[str]:
    """Problems with running `config`'s optimizer on `device`; empty when it runs there.

    For adamw-8bit: bitsandbytes must be installed, and must step an 8-bit AdamW on this device type
    (tried once per device type on a 4096-element tensor: the kernels it registers differ by version
    and platform, and trying is the only answer that does not go stale).

    Example:
        >>> optimizer_problems(OptimizerConfig("adafactor"), "cpu")
        []
    """
    if config.name != "adamw-8bit":
        return []
    device = torch.device(device)
    try:
        bitsandbytes = _import_bitsandbytes()
    except ImportError:
        return [
            f"`optimizer` is adamw-8bit but bitsandbytes is not installed; install the extra with `{EXTRA}` "
            "(or `pip install bitsandbytes`), or use `optimizer: adafactor` (also small state) or `adamw`."
        ]
    error = _eight_bit_error(device.type)
    if error:
        return [
            f"`optimizer` is adamw-8bit but bitsandbytes {bitsandbytes.__version__} cannot run its 8-bit AdamW on "
            f"the {device.type} device ({error}); train on a CUDA GPU, or use `optimizer: adafactor` or `adamw`."
        ]
    return []


def _import_bitsandbytes() -> Any:
    """Import bitsandbytes without its CPU backend's warning about a 4-bit kernel tfmem never uses.

    On CPUs with AVX512-BF16, importing bitsandbytes logs "Failed to load CPU gemm_4bit_forward from
    kernels-community" unless the `kernels` package is installed; 8-bit AdamW does not need it.
    """
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        quiet.setLevel(level)
    return bitsandbytes


@functools.lru_cache(maxsize=None)
def _eight_bit_error(device_type: str) -> str | None:
    """Step a real 8-bit AdamW once on `device_type`; the first line of the error, or None."""
    try:
        import bitsandbytes as bnb

        p = torch.nn.Parameter(torch.zeros(MIN_8BIT_SIZE, device=device_type))
        p.grad = torch.ones_like(p)
        opt = bnb.optim.AdamW(params=[p], lr=1e-3, optim_bits=8, is_paged=False)
        # bitsandbytes' per-parameter overrides are process-wide, keyed by id() and by (group, index):
        # after a Trainer registered its embeddings, parameter (0, 0) of *every* later optimizer is
        # 32-bit. The probe must test the 8-bit kernel, so it reads no overrides.
        opt.mng = bnb.optim.GlobalOptimManager.__new__(bnb.optim.GlobalOptimManager)
        opt.mng.initialize()
        opt.step()
        if opt.state[p]["state1"].dtype != torch.uint8:
            return "the probe's state is not 8-bit"
    except Exception as e:  # any failure means: not on this device
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return None


def trainer_optim(config: OptimizerConfig) -> str | None:
    """The `TrainingArguments.optim` the recipe sets, or None to leave the Trainer's default (adamw)."""
    return None if config.name == "adamw" else TRAINER_OPTIM[config.name][0]


def trainer_optim_problems(config: OptimizerConfig, optim: Any) -> list[str]:
    """Whether a user's `TrainingArguments.optim` contradicts the recipe's optimizer.

    The recipe's default, adamw, is today's behaviour: it leaves whatever `optim` the user chose (SGD,
    say) alone. A lighter optimizer in the recipe takes the place of a default `optim` (AdamW); any other
    `optim` must be one of the recipe's own names.
    """
    optim = str(getattr(optim, "value", optim))
    if config.name == "adamw" or optim in TRAINER_DEFAULT_OPTIM or optim in TRAINER_OPTIM[config.name]:
        return []
    return [
        f"`optimizer` is {config.name!r} in the recipe but the TrainingArguments ask for optim={optim!r}; "
        f"leave `optim` at its default and let the recipe decide, or use a recipe with the optimizer you want "
        f"(`optimizer: {' | '.join(NAMES)}`)."
    ]


def build_optimizer(
    config: OptimizerConfig, params: Iterable[Any] | torch.nn.Module, lr: float, **kwargs: Any
) -> torch.optim.Optimizer:
    """Build the optimizer `config` names, as the Trainer builds it for the matching `optim`.

    Args:
        config: the recipe's optimizer piece.
        params: the model, or its parameters or parameter groups; parameters that do not require a
            gradient are left out (frozen parameters get no state). Give the model for adamw-8bit to keep
            its embeddings' state in 32-bit, as the Trainer does.
        lr: the learning rate.
        **kwargs: passed to the optimizer (weight_decay, betas, eps, ...).

    Raises:
        RecipeError: adamw-8bit without bitsandbytes or on a device it does not run on (checked on the
            device of the first parameter, before any step).

    Example:
        >>> net = torch.nn.Linear(4, 2)
        >>> type(build_optimizer(OptimizerConfig("adafactor"), net.parameters(), lr=1e-3)).__name__
        'Adafactor'
    """
    model = params if isinstance(params, torch.nn.Module) else None
    groups = _trainable(model.parameters() if model is not None else params)
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **kwargs)
    if config.name == "adamw-8bit":
        device = _first_device(groups)
        if problems := optimizer_problems(config, device):
            raise RecipeError(problems, heading=f"optimizer adamw-8bit cannot train on {device}")
        import bitsandbytes as bnb

        # The class and arguments transformers uses for optim="adamw_bnb_8bit".
        optimizer = bnb.optim.AdamW(groups, lr=lr, optim_bits=8, is_paged=False, **kwargs)
        # bitsandbytes keeps per-parameter overrides in one process-wide manager, keyed by id() and by
        # (group, index), and never forgets them: an earlier optimizer's embedding entry would make
        # parameter (0, 0) of this one 32-bit. Resetting that manager would instead wipe what another
        # optimizer (a Trainer's) registered and has not applied yet (overrides resolve at the first step).
        # So this optimizer gets a manager of its own, holding only this model's overrides.
        manager = bnb.optim.GlobalOptimManager.__new__(bnb.optim.GlobalOptimManager)
        manager.initialize()
        optimizer.mng = manager
        if model is not None:  # and, as the Trainer does, embeddings in 32-bit
            for module in model.modules():
                if isinstance(module, torch.nn.Embedding):
                    manager.register_module_override(module, "weight", {"optim_bits": 32})
        return optimizer
    from transformers.optimization import Adafactor

    # As the Trainer builds optim="adafactor": a fixed learning rate, no parameter-scale heuristics.
    return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, **kwargs)


def _trainable(params: Iterable[Any]) -> list[Any]:
    items = list(params)
    if items and isinstance(items[0], dict):
        return [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in items]
    return [p for p in items if p.requires_grad]


def _first_device(groups: list[Any]) -> torch.device:
    for item in groups:
        tensors = item["params"] if isinstance(item, dict) else [item]
        for t in tensors:
            return t.device
    raise ValueError("no trainable parameters were given to the optimizer.")
