"""Data: URLs on disk or S3, dataset readers and parallel resumable packing, streaming
P×K batches that survive bad data, transforms, the glyphs dataset."""
