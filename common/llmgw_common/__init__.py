"""What the llm-gateway proxy and operator share: the ``llmgw`` command's host and the proxy's
configuration schema (the operator renders it, the proxy loads it). It depends on PyYAML alone, so the
operator image can check a configuration without carrying the proxy.
"""

__version__ = "0.1.0"
