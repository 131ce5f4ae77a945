"""The notebooks' exercise checks, kept apart from the library so the stage modules read as a library.
May import any layer."""
