"""The image-stack diffusion network: log D (and its variance) from a short stack around a track."""
