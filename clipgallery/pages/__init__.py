"""Pages of the clipgallery web app."""
