"""Data: load rows, detect formats, render chat templates with assistant masks, tokenize, batch."""
