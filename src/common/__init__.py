"""Infrastructure both the control plane and the runner use (retries,
settings from the environment, ...). Nothing here imports ``control`` or
``runner``."""
