"""Test helpers shipped with Kommander: the deterministic simulator and conformance suites."""
