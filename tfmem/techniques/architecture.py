"""Find a model's embeddings and encoder layers by introspection, across BERT-family architectures.

(Stub: the structure finder is being implemented; see `find_backbone`.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from tfmem.errors import UnsupportedModelError
from tfmem.techniques._fields import type_problem


@dataclass(frozen=True)
class ModulePaths:
    """Where the embeddings and the encoder layers are, for models tfmem cannot read by itself.

    Args:
        embeddings: dotted module path of the embedding block, e.g. "bert.embeddings".
        layers: dotted module path of the `nn.ModuleList` of encoder layers, e.g. "bert.encoder.layer".
    """

    embeddings: str | None = None
    layers: str | None = None

    def problems(self) -> list[str]:
        out = []
        for name in ("embeddings", "layers"):
            value = getattr(self, name)
            if value is not None:
                problem = type_problem(f"modules.{name}", value, str, f"modules: {{{name}: bert.encoder.layer}}")
                if problem:
                    out.append(problem)
                elif not value.strip():
                    out.append(f"`modules.{name}` is empty; give a dotted module path such as `bert.encoder.layer`.")
        return out


@dataclass
class Backbone:
    """What `find_backbone` found in a model."""

    family: str
    embeddings: nn.Module | None
    embeddings_path: str | None
    layers: list[nn.Module]
    layers_path: str
    shared_layers: bool = False  # ALBERT: every layer position runs the same weights
    notes: list[str] = field(default_factory=list)


def find_backbone(model: nn.Module, paths: ModulePaths | None = None) -> Backbone:
    raise UnsupportedModelError("not implemented yet")
