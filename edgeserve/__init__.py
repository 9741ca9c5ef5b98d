"""edgeserve: run LLMs on your own hardware."""
