"""nanodo-sam: Nanodo Transformers on C4 with the SAM family of gradient steps."""

__version__ = "0.1.0"
