"""Recipes composed into a validated config, and the stage graph planned from it. Imports the core only."""
