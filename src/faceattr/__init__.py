"""faceattr: learn a binary face attribute from 64x64 photos and predict it with the lowest HTER."""

__version__ = "0.1.0"
