"""Getting intermediate features out of any model, by module name."""

from __future__ import annotations

from torch import Tensor, nn

from kdkit.errors import KdkitError, close_names

INPUT_SUFFIX = ":input"


def module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def last_linear(model: nn.Module) -> str:
    """Name of the last ``nn.Linear`` registered in ``model`` (the classifier, for most nets)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise KdkitError(f"{type(model).__name__} has no nn.Linear: set task.embedding_module")
    return names[-1]


def _first_tensor(x):
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)) and x:
        return _first_tensor(x[0])
    if isinstance(x, dict) and x:
        return _first_tensor(next(iter(x.values())))
    raise TypeError(f"module produced no tensor: {type(x)}")


class FeatureTap:
    """Records the output (or, with a ``":input"`` suffix, the input) of named submodules.

    Forward hooks are registered once and stay for the tap's life; each forward fills
    ``store``, which ``pop()`` hands over and clears. Works for timm, torchvision, HF and
    user-defined models alike, since every ``nn.Module`` has named submodules.

    Args:
        model: the network to tap.
        names: module names as in ``model.named_modules()``, e.g. ``"layer3"``,
            ``"layer3.2.conv2"``, ``"fc:input"`` (input of the classifier = pooled embedding).
        role: "student" or "teacher", for error messages.
    """

    def __init__(self, model: nn.Module, names, role: str = "model"):
        self.names = list(dict.fromkeys(names))
        self.store: dict[str, Tensor] = {}
        self.handles = []
        modules = dict(model.named_modules())
        for name in self.names:
            base = name[: -len(INPUT_SUFFIX)] if name.endswith(INPUT_SUFFIX) else name
            if base not in modules or not base:
                raise KdkitError(
                    f"{role} feature {name!r} is not a module of {type(model).__name__}; "
                    f"close valid names: {close_names(base, module_names(model))}"
                )
            module = modules[base]
            if name.endswith(INPUT_SUFFIX):
                self.handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            else:
                self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(_module, _inputs, output):
            self.store[name] = _first_tensor(output)

        return hook

    def _pre_hook(self, name):
        def hook(_module, inputs):
            self.store[name] = _first_tensor(inputs)

        return hook

    def pop(self) -> dict[str, Tensor]:
        out, self.store = self.store, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
