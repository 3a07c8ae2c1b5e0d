"""The Gram matrix of the task gradients of the shared parameters without the gradients
(``method.weighting_gradients=gramian``), by torchjd's autogram engine.

The Gram-based strategies (every one whose ``supports_representation`` is true: MGDA, PCGrad,
CAGrad, UPGrad...) need only ``G G^T``, the inner products of the K task gradients of the
shared parameters, not ``G`` itself. torchjd's ``autogram.Engine`` (Quinton & Rey, "Jacobian
Descent for Multi-Objective Optimization", Section 6) hooks the layers that own the shared
parameters and, in one backward pass vmapped over the K losses, adds each layer's ``J_l J_l^T``
as the pass reaches it, so at most K copies of one layer's gradient exist at a time instead
of the ``[K, P]`` matrix (and K sequential backward passes) of the parameter form. The
coefficients, and so the update, are those of the parameter form (to rounding; tested).

Why the engine is used as it is, with ``batch_dim=None``: its batched mode needs layers that
treat images independently, and BatchNorm (SegNet's, the ResNets') does not. What it asks of
the forward pass, and what follows here:

- every forward call of a hooked layer that is part of the graph must reach a task loss (the
  engine counts the calls and waits for each one's Jacobian): a method that ran the shared
  layers on an input only its other terms read would get a :class:`ConfigError` naming the
  key at its first step. Every shipped method meets the rule (sl, ssl, xtc, jtr, mean_teacher,
  pseudo_label, direct_map, perceptual_map, contrastive, discriminator and jtl were trained
  with ``gramian``);
- the Gram matrix is the process's own: under torchrun the global batch's would need the
  cross-process inner products (every process's gradients), so the loop refuses the form
  there, and with ``train.compile`` (forward hooks inside a compiled graph are not tested).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mtpsl.core.errors import ConfigError


class SharedGramian:
    """``G G^T`` of the losses' gradients with respect to ``shared`` (the model's declared
    shared parameters), from torchjd's engine on the layers that own them. Built once per
    run, before the first forward pass (the engine's hooks record the forward calls)."""

    def __init__(self, model: nn.Module, shared: Sequence[nn.Parameter]) -> None:
        from torchjd.autogram import Engine

        self.layers = owning_layers(model, shared)
        self.engine = Engine(*self.layers, batch_dim=None)

    def __call__(self, losses: Tensor) -> Tensor:
        """The ``[K, K]`` Gram matrix of the ``[K]`` losses' shared gradients (the graph is
        kept for the backward pass that follows)."""
        try:
            return self.engine.compute_gramian(losses)
        except ValueError as err:
            if "without an associated backward" not in str(err):
                raise
            raise ConfigError(
                "method.weighting_gradients: 'gramian' needs every forward pass of the shared "
                "layers to reach a task loss; this method also runs them on inputs only its "
                "other terms read (a second view, a consistency target): use 'parameters' or "
                "'representation'") from None

    def discard(self) -> None:
        """Forget the forward calls of a step whose Gram matrix is not needed (no task
        present): the engine counts calls until ``compute_gramian`` and resets only there."""
        for computer in self.engine._gramian_computers.values():
            computer.reset()


def owning_layers(model: nn.Module, shared: Sequence[nn.Parameter]) -> list[nn.Module]:
    """The modules whose own parameters are exactly the trainable ``shared`` ones: the
    smallest units the engine can hook (each brings its whole subtree, so a module that owns
    parameters directly and has children stands for all of them)."""
    wanted = {id(p) for p in shared if p.requires_grad}
    layers: list[nn.Module] = []
    _collect(model, wanted, layers)
    covered = {id(p) for layer in layers for p in layer.parameters() if p.requires_grad}
    if covered != wanted:
        raise ConfigError(
            f"method.weighting_gradients: 'gramian' needs the shared parameters to be whole "
            f"layers of {type(model).__name__}; {len(wanted - covered)} of them are not "
            f"(use 'parameters')")
    return layers


def _collect(module: nn.Module, wanted: set[int], out: list[nn.Module]) -> None:
    if any(module is seen for seen in out):  # one module under two parents: hooked once
        return
    own = [id(p) in wanted for p in module.parameters(recurse=False) if p.requires_grad]
    if any(own):
        if all(own) and all(id(p) in wanted for p in module.parameters() if p.requires_grad):
            out.append(module)
            return
        raise ConfigError(
            f"method.weighting_gradients: 'gramian' cannot separate {type(module).__name__}'s "
            f"shared parameters from its others (use 'parameters')")
    for child in module.children():
        _collect(child, wanted, out)
