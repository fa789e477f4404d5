"""Evaluation: Fréchet distance over pluggable feature extractors (`fid`) and image grids (`grid`)."""
