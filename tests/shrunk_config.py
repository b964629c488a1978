"""The `tiny` preset shrunk further for tests: 32 px images, 2-layer width-64 vision and encoder, 4 queries,
a 32 x 16 codebook. A random-init model builds, steps, saves and answers in milliseconds.

Test folders add their own overrides after these (later ones win).
"""

SMALL_MODEL = [
    "image.size=32",
    "vision.hidden_size=64",
    "vision.num_layers=2",
    "vision.num_heads=2",
    "vision.intermediate_size=128",
    "vision.patch_size=8",
    "encoder.hidden_size=64",
    "encoder.num_layers=2",
    "encoder.num_heads=2",
    "encoder.intermediate_size=128",
    "encoder.num_queries=4",
    "encoder.max_position_embeddings=64",
    "encoder.embed_dim=32",
    "text.max_length=32",
    "generator.top_size=4",
    "generator.bottom_size=8",
    "generator.codebook_size=32",
    "generator.codebook_dim=16",
    "generator.adapter_hidden=32",
    "generator.decoder_channels=16",
    "generator.kmeans_init=false",
]
