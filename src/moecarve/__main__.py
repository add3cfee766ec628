"""`python -m moecarve ...` is the `moecarve` command (and what `accelerate launch -m moecarve` runs)."""

from moecarve.cli import main

main()
