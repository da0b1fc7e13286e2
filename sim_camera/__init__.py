"""Physics simulators with exact ground truth, and the Micro-Manager Python devices built on them."""
