"""The flat float32 layout of a model's parameters.

Weights travel between the coordinator and the client actors as one flat
float32 vector of length ``d`` per model version (see DESIGN.md, "Performance
architecture"). :class:`ParamLayout` is the one place that maps that vector to
a module's named parameters and back, in ``named_parameters()`` order.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class ParamLayout:
    """Where each named parameter lives in the flat vector.

    Parameter ``names[i]`` of shape ``shapes[i]`` occupies
    ``flat[offsets[i] : offsets[i] + numels[i]]``, row-major; ``size`` (= d) is
    the total length. The order is ``module.named_parameters()`` order, so two
    modules built from the same config share one layout.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    size: int

    @classmethod
    def of(cls, module: nn.Module) -> ParamLayout:
        """The layout of ``module``; a module with buffers is refused, since the
        flat vector would not capture them."""
        buffers = [name for name, _ in module.named_buffers()]
        if buffers:
            raise ValueError(f"a model must keep all its state in parameters; it has buffers {buffers}")
        names, shapes, offsets = [], [], []
        offset = 0
        for name, param in module.named_parameters():
            names.append(name)
            shapes.append(tuple(param.shape))
            offsets.append(offset)
            offset += param.numel()
        return cls(tuple(names), tuple(shapes), tuple(offsets), offset)

    @property
    def d(self) -> int:
        """Number of scalars in the flat vector (alias of ``size``)."""
        return self.size

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(prod(shape) for shape in self.shapes)

    @property
    def num_bytes(self) -> int:
        """Size of one float32 weight or update vector, in bytes."""
        return 4 * self.size

    def flatten(self, module: nn.Module) -> np.ndarray:
        """``module``'s parameters as a new flat float32 numpy vector of length d."""
        params = self._params_of(module)
        if not params:
            return np.zeros(0, dtype=np.float32)
        flat = torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params])
        return flat.cpu().numpy()

    def load_into(self, module: nn.Module, flat: np.ndarray | torch.Tensor) -> None:
        """Copy the flat vector ``flat`` (length d) into ``module``'s parameters, in place."""
        # A read-only array (as Ray hands out) is copied rather than wrapped, which torch warns about.
        read_only = isinstance(flat, np.ndarray) and not flat.flags.writeable
        flat_t = torch.tensor(flat) if read_only else torch.as_tensor(flat)
        if flat_t.shape != (self.size,):
            raise ValueError(f"expected a flat vector of shape ({self.size},), got {tuple(flat_t.shape)}")
        with torch.no_grad():
            for param, offset, numel in zip(self._params_of(module), self.offsets, self.numels):
                param.copy_(flat_t[offset : offset + numel].view(param.shape))

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` (shape ``(..., d)``) as named tensors of shape ``(..., *shape)``.

        The result can be passed to ``torch.func.functional_call``; gradients
        flow back to ``flat``.
        """
        if flat.shape[-1:] != (self.size,):
            raise ValueError(f"expected a tensor of shape (..., {self.size}), got {tuple(flat.shape)}")
        lead = tuple(flat.shape[:-1])
        return {
            name: flat[..., offset : offset + numel].reshape(*lead, *shape)
            for name, shape, offset, numel in zip(self.names, self.shapes, self.offsets, self.numels)
        }

    def _params_of(self, module: nn.Module) -> list[nn.Parameter]:
        named = list(module.named_parameters())
        if tuple(name for name, _ in named) != self.names or tuple(tuple(p.shape) for _, p in named) != self.shapes:
            raise ValueError("the module's parameters do not match this layout")
        return [p for _, p in named]
