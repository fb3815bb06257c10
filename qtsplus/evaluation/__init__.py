"""Evaluation of QTSplus checkpoints against the teacher and other selectors (paper Sec. 4.3-4.5)."""
