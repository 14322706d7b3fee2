"""bitmig: live migration of block dirty bitmaps between hosts."""

__version__ = "0.1.0"
