"""The llm-gateway operator: reconciles ``LLMGateway`` resources into running gRPC+REST LLM proxies.

Modules:
  k8s_build      build kube-apiserver and etcd from their Go modules (for the local control plane)
  cluster        run a local control plane (etcd + kube-apiserver) on 127.0.0.1
"""
