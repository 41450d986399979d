"""The data path: row formats (formats.py), prompt templates (templates.py), tokenization and masks (pipeline.py)."""
