"""Networks of the paper: VAE-D4, CE-UNet, the one-step restorer, tiling, colour fix."""
