"""Sphinx configuration for Kommander's documentation."""

project = "Kommander"
author = "Kommander developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
autodoc_member_order = "bysource"
