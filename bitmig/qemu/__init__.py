"""QEMU interop: the qcow2 bitmap format, qemu-img, and (elsewhere) QMP.

Layer: above bitmig.session, below bitmig.daemon. A user's image is only ever changed
through QEMU's own code (qemu-img); this package reads images directly, read-only, and
writes only fresh images of its own.
"""
