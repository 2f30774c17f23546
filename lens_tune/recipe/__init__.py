"""Recipes: the YAML files that describe a run, validated into typed settings."""
