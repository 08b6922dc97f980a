"""Reading images and labels, and writing files atomically."""
