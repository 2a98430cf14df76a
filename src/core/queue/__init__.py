"""The matching queue's worker: claims batches, embeds, feeds the engine, writes lists."""
