"""Interoperability with other model libraries: one module per outside model family
(Hugging Face config + weights ⇄ spec + weights), registered like block kinds.

``import_hf(folder, out)`` and ``export_hf(spec, out, weights=...)`` (``archir import hf``,
``archir export --format hf``); ``families()`` lists what is supported.
``transformers`` is optional: without it import and export work and the logit parity check
is skipped (and said so).
"""

from archir.interop.base import Family, HFConfig, Rule, families
from archir.interop.hf import PARITY_RTOL, export_hf, import_hf

__all__ = ["Family", "HFConfig", "PARITY_RTOL", "Rule", "export_hf", "families", "import_hf"]
