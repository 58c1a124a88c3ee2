"""Optional dependencies: each belongs to one extra of the ``seer-ssl`` distribution, and a missing one says which.

pip install "seer-ssl[faiss]"        faiss-cpu: the faiss kNN backend on CPU
pip install "seer-ssl[gpu]"          faiss-gpu instead (the same ``faiss`` module: never both)
pip install "seer-ssl[plots]"        matplotlib: accuracy plots of the demo and eval suites
pip install "seer-ssl[tensorboard]"  TensorBoard logs of pretraining
pip install "seer-ssl[onnx]"         onnx, onnxscript, onnxruntime: ONNX export, extract_features(backend="onnxruntime")
pip install "seer-ssl[openvino]"     openvino (+ the ONNX exporter): extract_features(backend="openvino")
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

__all__ = ["DISTRIBUTION", "EXTRAS", "require", "optional", "install_hint"]

DISTRIBUTION = "seer-ssl"
# import name -> (extra, what it is for)
EXTRAS: dict[str, tuple[str, str]] = {
    "faiss": ("faiss", "the faiss kNN backend (faiss-cpu; seer-ssl[gpu] installs faiss-gpu instead)"),
    "matplotlib": ("plots", "plots"),
    "torch.utils.tensorboard": ("tensorboard", "TensorBoard logs"),
    "tensorboard": ("tensorboard", "TensorBoard logs"),
    "onnxscript": ("onnx", "ONNX export"),
    "onnxruntime": ("onnx", 'extract_features(backend="onnxruntime")'),
    "openvino": ("openvino", 'extract_features(backend="openvino")'),
}
_SAID: set[str] = set()


def install_hint(module: str) -> str:
    """``pip install "seer-ssl[extra]"`` for an optional module."""
    extra = EXTRAS.get(module, (None, None))[0]
    return f'pip install "{DISTRIBUTION}[{extra}]"' if extra else f"pip install {module.split('.')[0]}"


def require(module: str, what: str | None = None) -> ModuleType:
    """Import ``module`` or raise ImportError with one line naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        need = what or EXTRAS.get(module, (None, module))[1]
        raise ImportError(
            f"{need} needs {module.split('.')[0]}, which is not installed: {install_hint(module)}"
        ) from exc


def optional(module: str, what: str) -> ModuleType | None:
    """Import ``module``, or print one line (once per process) naming the extra and return None: ``what`` is
    skipped, the rest of the job goes on."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if module not in _SAID:
            _SAID.add(module)
            print(f"seer: {what} skipped: {module.split('.')[0]} is not installed ({install_hint(module)})",
                  file=sys.stderr)  # fmt: skip
        return None
