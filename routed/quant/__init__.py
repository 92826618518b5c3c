"""Weight formats as data plus pure functions (FP8 block-scaled today)."""
