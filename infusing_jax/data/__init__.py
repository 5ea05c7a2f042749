"""Input: sources, the paper's splits, preprocessing, and the multi-domain tf.data pipeline."""
