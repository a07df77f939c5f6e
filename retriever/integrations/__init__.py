"""Where agents live: an MCP server and retrievers for LangChain and LlamaIndex.

Each talks to a running service over gRPC through the typed clients
(:mod:`retriever.client`, :mod:`retriever.aio_client`); none reaches into the core. Each
needs its extra, imported only by its own module:

- :mod:`retriever.integrations.mcp_server` (``retriever[mcp]``): ``retriever mcp``;
- :mod:`retriever.integrations.langchain` (``retriever[langchain]``):
  :class:`~retriever.integrations.langchain.RetrieverServiceRetriever`;
- :mod:`retriever.integrations.llamaindex` (``retriever[llamaindex]``):
  :class:`~retriever.integrations.llamaindex.RetrieverServiceRetriever`.

See docs/agents.md.
"""
