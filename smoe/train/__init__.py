"""Training: from scratch, from a checkpoint, or fine-tuning with LoRA / QLoRA (see loop.py)."""

from smoe.train.batches import ExampleStream, SeededOrder, TokenStream, domain_streams, tokenize_documents
from smoe.train.config import TrainConfig
from smoe.train.evaluate import evaluate, example_perplexity, heldout_perplexity, stream_perplexity
from smoe.train.loop import load_data, lr_at, model_to_train, train, train_step_loss
from smoe.train.losses import expert_load, load_balancing_loss, router_z_loss

__all__ = [
    "ExampleStream", "SeededOrder", "TokenStream", "TrainConfig", "domain_streams", "evaluate",
    "example_perplexity", "expert_load", "heldout_perplexity", "load_balancing_loss", "load_data", "lr_at",
    "model_to_train", "router_z_loss", "stream_perplexity", "tokenize_documents", "train", "train_step_loss",
]
