"""Image-quality metrics, including offline LPIPS/DISTS built from registry-shipped weights."""
