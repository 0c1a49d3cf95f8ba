"""The llm-gateway operator: reconciles ``LLMGateway`` resources into running gRPC+REST LLM proxies."""
