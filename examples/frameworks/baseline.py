"""The embeddings the framework examples must return, computed here with the same
model code and no framework and no instrumentation: one text at a time."""

from __future__ import annotations


def embed_one_by_one(texts: list[str]) -> list[list[float]]:
    import torch

    from examples.embedding_service.app import Embedder, model_dir

    torch.set_num_threads(1)
    model = Embedder(model_dir(), "cpu", max_length=128)
    return [model([text])[0].tolist() for text in texts]
