"""Training data: generated corpora, local files, chat formatting, tokenization and packing into parquet."""
