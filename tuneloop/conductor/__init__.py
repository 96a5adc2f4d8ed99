"""The conductor: assembles tuneloop's processes and runs the loop's order (placeholder while the move lands)."""
