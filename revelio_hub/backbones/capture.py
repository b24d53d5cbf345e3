"""Reading block outputs out of a forward pass, one store per call, safe across threads.

A served app runs several requests at once on **one** shared backbone (the
model is by far the largest object in memory). Hooks that are added before a
pass and removed after it are shared state: with two passes in flight, one
request's hooks fire inside the other's forward pass and write into the wrong
store, or its early exit abandons the other pass half way (issue 10 measured,
before this module: 8 clients × 96 images, 4 ``KeyError``\\ s and 41 of 92
answers different from one-at-a-time answers; quoted in ``docs/benchmarks.md``).

So :class:`LayerTaps` registers one forward hook per block **once**, when the
backbone is built, and every call says what it wants through a
:class:`contextvars.ContextVar`: the hook looks up the calling thread's (or
task's) current request and does nothing when there is none or the request is
for other blocks. Each call therefore gets its own store and its own early
exit, and concurrent calls cannot see each other.

Why this design rather than the two alternatives (figures in
``docs/benchmarks.md``, "## The app"): a lock around the backbone pass is
also correct, and on the toy release it measured as fast within the noise of a
loaded 2-core machine (its pass is mostly Python, so the GIL serialises it
anyway), but it serialises every backbone for good, whereas per-call capture
lets passes overlap wherever the kernels release the GIL (large models, GPUs).
One backbone replica per worker multiplies the largest object in memory by
the concurrency, and a copied model's features differ from the original's by
up to 2.4e-6 (other memory alignment), so answers would depend on the replica.
Capture per call keeps one copy of the weights and bit-identical answers.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn


class _EarlyExit(Exception):
    """Raised from the hook of the deepest requested block to abandon the rest of the pass."""


@dataclass
class _Request:
    """What one call wants from the pass it is running, and where the outputs land."""

    modules: Mapping[str, nn.Module]  # the owning backbone's blocks: hooks of other models ignore this request
    wanted: frozenset[str]
    deepest: Optional[str]  # raise _EarlyExit after storing this block's output; None: run to the end
    store: dict[str, torch.Tensor] = field(default_factory=dict)


#: The request of the pass running in this thread / asyncio task (``None`` outside :meth:`LayerTaps.run`).
_ACTIVE: ContextVar[Optional[_Request]] = ContextVar("revelio_hub_capture", default=None)


def _first_output(output: Any) -> torch.Tensor:
    """A block's hidden state: down blocks return ``(hidden, residuals)``, others a tensor."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    return output


def _make_hook(name: str) -> Callable:
    # The hook closes over the layer name only (not over a store or a backbone),
    # so a deep copy of the model carries working hooks with it.
    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        request = _ACTIVE.get()
        if request is None or name not in request.wanted or request.modules.get(name) is not module:
            return
        request.store[name] = _first_output(output)
        if name == request.deepest:
            raise _EarlyExit

    return hook


class LayerTaps:
    """Forward hooks on a model's named blocks, registered once; each :meth:`run` captures for itself.

    Args:
        modules: canonical layer name -> block, in execution order.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self._order = list(self.modules)
        self._handles = [module.register_forward_hook(_make_hook(name)) for name, module in self.modules.items()]

    def run(self, forward: Callable[[], Any], layers: Sequence[str], early_exit: bool = True) -> dict[str, torch.Tensor]:
        """Call ``forward`` (one pass of the model) and return ``{layer: output}`` of this call only.

        With ``early_exit`` the pass stops right after the deepest requested
        block. Other threads' passes through the same modules are unaffected.
        """
        wanted = list(dict.fromkeys(layers))
        deepest = max(wanted, key=self._order.index) if early_exit else None
        request = _Request(self.modules, frozenset(wanted), deepest)
        token = _ACTIVE.set(request)
        try:
            forward()
        except _EarlyExit:
            pass
        finally:
            _ACTIVE.reset(token)
        missing = [name for name in wanted if name not in request.store]
        if missing:  # a denoiser that skips a block would otherwise give a KeyError far from the cause
            raise RuntimeError(f"The forward pass never ran block(s) {missing}; cannot read their outputs.")
        return request.store

    def remove(self) -> None:
        """Detach the hooks (the model then runs exactly as without taps)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


__all__ = ["LayerTaps"]
