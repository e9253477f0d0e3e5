"""ringctl's Hydra launcher: a sweep (`ringctl launch -m ...`) becomes one submitit job array."""
