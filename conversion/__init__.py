"""Turn a Llama / Mistral / Qwen2 checkpoint into a Multi-head Latent Attention model."""
