"""The embedded default task, "make the reviews positive": a review corpus and a gold judge."""
