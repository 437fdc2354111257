"""Registration of model_type "parallax_qwen3" with the transformers Auto classes.

`install()` (called when `parallax_attention` is imported) registers without importing transformers
itself: if transformers' Auto modules are already loaded it registers now; otherwise a small import
hook registers right after they load. Without transformers installed it does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings

_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODELING_AUTO = "transformers.models.auto.modeling_auto"


def register_config() -> None:
    from transformers import AutoConfig

    from .configuration import MODEL_TYPE, ParallaxConfig
    AutoConfig.register(MODEL_TYPE, ParallaxConfig, exist_ok=True)


def register() -> None:
    """Register ParallaxConfig / ParallaxModel / ParallaxForCausalLM with AutoConfig / AutoModel /
    AutoModelForCausalLM. Idempotent."""
    from transformers import AutoModel, AutoModelForCausalLM

    from .configuration import ParallaxConfig
    from .modeling import ParallaxForCausalLM, ParallaxModel
    register_config()
    AutoModel.register(ParallaxConfig, ParallaxModel, exist_ok=True)
    AutoModelForCausalLM.register(ParallaxConfig, ParallaxForCausalLM, exist_ok=True)


def _safely(fn) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - registration must never break importing transformers
        warnings.warn(f"parallax_attention: could not register parallax_qwen3 with transformers: {e!r}",
                      RuntimeWarning, stacklevel=2)


class _AfterExec(importlib.abc.Loader):
    def __init__(self, inner, after):
        self.inner, self.after = inner, after

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _safely(self.after)


class _AutoHook(importlib.abc.MetaPathFinder):
    """Registers once transformers' Auto modules have executed."""

    targets = {_CONFIG_AUTO: register_config, _MODELING_AUTO: register}

    def find_spec(self, fullname, path, target=None):
        after = self.targets.get(fullname)
        if after is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        if fullname == _MODELING_AUTO:
            # Everything is registered from here on; stop watching imports.
            try:
                sys.meta_path.remove(self)
            except ValueError:
                pass
        spec.loader = _AfterExec(spec.loader, after)
        return spec


def install() -> None:
    if _MODELING_AUTO in sys.modules:
        _safely(register)
        return
    if _CONFIG_AUTO in sys.modules:
        _safely(register_config)
    if importlib.util.find_spec("transformers") is None:
        return
    if not any(isinstance(f, _AutoHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _AutoHook())
