"""kvr worker package."""
