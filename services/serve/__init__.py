"""Ray Serve adapters: the OpenAI-compatible gateway and the multi-LoRA LLM deployment."""
