"""`sandbox gc` (placeholder until sandbox/gc.py lands)."""
