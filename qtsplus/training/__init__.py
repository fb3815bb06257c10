"""Training of the QTSplus selector (paper Sec. 3.3, 4.2): data, model, DeepSpeed loop, launcher."""
