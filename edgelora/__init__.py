"""edgelora: from a small dataset of your own to a fine-tuned model that runs offline on a laptop."""
__version__ = "0.1.0"
