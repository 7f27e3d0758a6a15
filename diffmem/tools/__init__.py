"""Tools around the op: ``diffmem bench`` (bench/, the comparison benchmark against torch
methods) and ``diffmem demo`` (demo.py, accuracy and speed of every backend)."""
