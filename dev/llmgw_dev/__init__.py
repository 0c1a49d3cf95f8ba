"""llm-gateway's development tools: fake providers, the demos, a local Kubernetes control plane and the
local kubelet that runs proxy pods as processes. Installed by the ``[dev]`` extra, never in an image;
nothing in the product imports this package.
"""
