"""tokenrig: measure how fast and how cheaply LLMs serve and train on your own GPUs."""

__version__ = "0.1.0"
