"""gptoss-webui: fine-tune gpt-oss with LoRA and serve it with vLLM."""
