"""The screened studies and their CT-CLIP embeddings in FiftyOne (``python -m visualisation``).

records.py: a study as a flat record (pure); sources.py: JSON reports, previews, the embeddings
parquet, a labels CSV; media.py: the image of a sample; embedding_map.py: UMAP or PCA;
dataset.py: the persistent FiftyOne dataset and the brain's map; app.py: the App on
127.0.0.1; cli.py: the command. See README.md.
"""
