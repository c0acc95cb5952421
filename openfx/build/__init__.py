"""`openfx-cli fn build`: per-function Docker build contexts from the shared templates in dockerfiles/."""
