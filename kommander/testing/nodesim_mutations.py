"""Deliberately broken components for the node simulator (placeholder, filled below)."""
MUTATIONS: dict = {}
