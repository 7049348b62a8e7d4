"""Stand up an LLM server: synthetic checkpoints, the HTTP API layer, engines and the launcher."""
