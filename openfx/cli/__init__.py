"""`openfx-cli`: the command line (OpenFx's commands and flags, plus up/down for the embedded platform)."""
