"""Training data: sources, images, captions, buckets, class images and the feature caches."""
