"""Adapters for existing trainers (optional dependencies: each module imports its trainer lazily)."""
