"""archir: a declarative graph compiler and neural-architecture search engine.

Python entry points::

    spec = archir.load_spec("specs/zoo/transformer.yaml")   # -> Spec (validated)
    model = archir.compile(spec)                             # -> torch.nn.Module
    report = archir.analyze(spec, seq_len=256)               # -> CostReport
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from archir.errors import ArchirError
from archir.spec import Spec, load_spec, spec_from_dict, spec_from_text

if TYPE_CHECKING:
    from archir.compiler import CompiledModel
    from archir.cost import CostReport


def compile(spec: Spec, **kwargs: Any) -> CompiledModel:  # noqa: A001
    """Lower a concrete spec to a ``torch.nn.Module`` (see :func:`archir.compiler.compile`)."""
    from archir.compiler import compile as _compile

    return _compile(spec, **kwargs)


def analyze(spec: Spec, seq_len: int | None = None) -> CostReport:
    """Cost report of a concrete spec (see :func:`archir.cost.analyze`)."""
    from archir.cost import analyze as _analyze

    return _analyze(spec, seq_len)


__all__ = [
    "ArchirError",
    "Spec",
    "__version__",
    "analyze",
    "compile",
    "load_spec",
    "spec_from_dict",
    "spec_from_text",
]
