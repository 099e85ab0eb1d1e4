"""Helpers that write sentence-transformers model folders for the config-parsing tests."""

from __future__ import annotations


def sentence_transformers_modules(*extra: str) -> list[dict[str, object]]:
    """Return a ``modules.json`` list: Transformer, Pooling, then the module types in ``extra``.

    Each module after the Transformer lives in the subfolder ``<idx>_<type>``, as
    sentence-transformers names them (``1_Pooling``, ``2_Normalize``).
    """
    modules: list[dict[str, object]] = []
    for index, module_type in enumerate(("Transformer", "Pooling", *extra)):
        modules.append(
            {
                "idx": index,
                "name": str(index),
                "path": "" if index == 0 else f"{index}_{module_type}",
                "type": f"sentence_transformers.models.{module_type}",
            }
        )
    return modules
