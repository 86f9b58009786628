"""Site side of fedseg: data loading, local statistics and the ClientApp."""
