"""Data: URLs on disk or S3, shard packing, streaming P×K batches, the glyphs dataset."""
