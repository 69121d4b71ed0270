"""Fails while importing: the error must point at the line below."""

SIZES = {"small": 4}
width = SIZES["large"]
