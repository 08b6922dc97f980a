"""From similarity matrices to tables: partners, threshold, pivot and across-image summaries."""
