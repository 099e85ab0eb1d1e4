"""Framework integrations: LangChain (:mod:`.langchain`) and LlamaIndex (:mod:`.llamaindex`).

The submodules import their framework, so import them directly::

    from uec_rag.integrations.langchain import UECEmbeddings, UECReranker
    from uec_rag.integrations.llamaindex import UECEmbedding, UECNodePostprocessor

Importing this package alone needs neither framework.
"""

__all__: list[str] = []
