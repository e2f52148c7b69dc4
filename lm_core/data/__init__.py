"""Text data for language-model training: sources by name, sequence packing, a resumable loader
(`PackedStream`, which a loader of other documents, e.g. moma's image-caption pairs, subclasses).

Light to import: TensorFlow Datasets is imported only when a TFDS-backed source (builtin, tfds:) is opened.

    source = get_text_source("builtin")             # or "files:corpus/*.txt", "tfds:lm1b"
    loader = LMDataLoader(source.split("train"), tokenizer, seq_len=256, global_batch_size=32, seed=0)
    batch = loader.next()                           # dict of numpy arrays; loader.state() -> checkpoint
"""

from lm_core.data.loader import LMDataLoader, iter_eval_batches
from lm_core.data.packing import BATCH_KEYS, PackCursor, PackedBatch, TokenizedDocument, pack_documents, pack_rows
from lm_core.data.sources import TextSource, get_text_source, register_text_source
from lm_core.data.stream import PackedStream

__all__ = ["BATCH_KEYS", "LMDataLoader", "PackCursor", "PackedBatch", "PackedStream", "TextSource",
           "TokenizedDocument", "get_text_source", "iter_eval_batches", "pack_documents", "pack_rows",
           "register_text_source"]
