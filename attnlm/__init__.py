"""Core of attnlm."""
