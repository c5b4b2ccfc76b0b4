"""Serving: the vLLM engine process, adapter merge, and the chat client."""
