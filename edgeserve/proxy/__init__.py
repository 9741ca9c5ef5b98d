"""Sidecar proxy: SJF admission in front of Ollama or any OpenAI-compatible server."""
