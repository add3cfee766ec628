"""Batch compression: `moecarve batch RECIPE.yaml` runs models x configurations x stages, resumably."""
