"""character-runner: one declarative spec per character, one command to build it."""

__version__ = "0.1.0"
