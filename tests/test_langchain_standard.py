"""LangChain's standard embeddings suites (langchain-tests) run on the three bundled models.

Wired as LangChain partner packages do: one subclass per suite, no standard
test overridden. Models load once per process and are shared by every
instance the suites construct; the memory cache keeps the runs independent of
the persistent cache folder.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_tests.integration_tests import EmbeddingsIntegrationTests
from langchain_tests.unit_tests import EmbeddingsUnitTests

from uec_rag.integrations.langchain import UECEmbeddings


class TestUECEmbeddingsUnit(EmbeddingsUnitTests):
    @property
    def embeddings_class(self) -> type[UECEmbeddings]:
        return UECEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"cache": "memory", "batch_size": 16}


@pytest.mark.slow
class TestUECEmbeddingsIntegration(EmbeddingsIntegrationTests):
    @property
    def embeddings_class(self) -> type[UECEmbeddings]:
        return UECEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"cache": "memory", "batch_size": 16}
