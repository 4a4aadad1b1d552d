"""Resource control behind one interface (see base.py)."""
