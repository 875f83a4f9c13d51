"""The calibration's task kinds (calibrate.py builds them; prose_needles.py holds the natural-text ones)."""

KEY_TASKS = ("passkey", "facts", "recall")  # a target in filler, early in the context
PROSE_TASKS = ("prose-number", "prose-name", "prose-setting", "two-hop")  # facts in natural text, asked by label
# natural text first: round-robin gives a level's first slots (and so short validation sets) to what users send
TASKS = PROSE_TASKS + KEY_TASKS
