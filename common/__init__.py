"""Pure, Flower-free core of fedseg: k-means statistics, secure-sum encoding, the segment model."""
