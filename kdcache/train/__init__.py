"""Stage 2: losses, the training recipe, evaluation and the run directory."""
