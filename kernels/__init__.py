"""q.kernels: numerics for every quantization scheme and, later, the GEMMs that run them.

Each op lives in its own folder with a pure-torch ``reference.py`` that is the spec and runs
anywhere (CPU CI included). Triton implementations sit beside them as ``triton_impl.py`` and
are imported lazily, so ``import q.kernels`` needs only torch.
"""

# q's source trees carry this marker so the guard below can tell them from other `kernels`.
__q_kernels__ = True

if __name__ == "kernels":
    # This folder is q.kernels, but Python started in a clone of q (a REPL, `python -c`, a
    # script or pytest in the repo root) finds it first under the top-level name `kernels`,
    # which is Hugging Face's package that transformers imports. Load the real package in our
    # place: the import system returns whatever sys.modules["kernels"] holds once this module
    # has run. docs/design.md says why this guard rather than a pytest setting.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    def _is_q_tree(spec) -> bool:
        try:
            with open(spec.origin, encoding="utf-8") as f:
                return "\n__q_kernels__ = True\n" in f.read()
        except (OSError, TypeError, UnicodeDecodeError):
            return False

    def _real_kernels_spec():
        for entry in _sys.path:
            spec = _machinery.PathFinder.find_spec("kernels", [entry or _os.getcwd()])
            # a plain folder (namespace package) or another copy of q's sources is not it
            if spec is not None and spec.loader is not None and not _is_q_tree(spec):
                return spec
        return None

    _spec = _real_kernels_spec()
    if _spec is not None:
        _real = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _real
        _spec.loader.exec_module(_real)
    else:
        # No real `kernels` is installed. Stand in as what an empty folder on sys.path would
        # be (a namespace package: no __file__, no version), which transformers' availability
        # check reads as "not installed"; any name imported from it says what happened.
        _why = (f"No module named 'kernels': {_os.path.dirname(__file__)} is q's source "
                "(import it as q.kernels); `pip install kernels` for Hugging Face's package")

        def _missing(name):
            if name.startswith("__"):
                raise AttributeError(name)
            raise ModuleNotFoundError(_why, name="kernels")

        _stand_in = _util.module_from_spec(_machinery.ModuleSpec("kernels", None,
                                                                 is_package=True))
        _stand_in.__path__ = []
        _stand_in.__getattr__ = _missing
        _sys.modules["kernels"] = _stand_in

from enum import Enum  # noqa: E402


class Impl(str, Enum):
    """Which implementation of an op to run: ``auto`` picks Triton on a capable GPU and
    torch's built-in CPU kernels on a CPU where they are fast (``kernels/configs/cpu.json``);
    ``reference`` is the pure-torch spec everywhere."""

    auto = "auto"
    triton = "triton"
    torch = "torch"
    reference = "reference"


__all__ = ["Impl"]
