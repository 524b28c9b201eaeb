"""The data stages, run once on CPUs before training: ingest (sources, readers) -> sample (dedup)
-> preprocess (normalize) -> tokenize (text_tokenizer, packing); loader.py reads what tokenize
committed, for the trainer and for evaluate."""
