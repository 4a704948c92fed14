"""Reasoning evaluation: chain of thought, self-consistency and tree-of-thought search on problems code checks."""
