"""Tasks with checkable answers, for SFT data, evaluation and preference data from samples."""
