"""Training DeepSeek-V3-family models with the engine's own model code (`routed train`).

    train(out, TrainConfig(...), model_config=..., data=...)  -> TrainResult   (routed.train.trainer)
    train_bpe(texts, vocab_size, out)                         -> vocabulary size (routed.train.bpe)

Balance by the DeepSeek-V3 correction-bias update and/or the sequence-wise auxiliary loss
(routed.train.balance), multi-token prediction loss, checkpoints in the Hugging Face layout that load in
routed and in transformers (routed.train.checkpoint). Nothing here is imported by the engine.
"""

from routed.train.bpe import train_bpe
from routed.train.trainer import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train", "train_bpe"]
