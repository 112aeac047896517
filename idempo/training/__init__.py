"""Training of each generation."""

from idempo.training.sft import TrainStats, encode_chat_example, encode_document, learning_rate_factor, train_sft

__all__ = ["TrainStats", "encode_chat_example", "encode_document", "learning_rate_factor", "train_sft"]
