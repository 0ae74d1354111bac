"""Model files on the shared diffusion core (one file per method)."""
