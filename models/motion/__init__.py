"""Motion-state networks (Stat / RanW / RCir / Circ / Flow): data, architectures, training, export."""
