"""kvr monitor package."""
