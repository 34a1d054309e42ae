"""kvr router package."""
