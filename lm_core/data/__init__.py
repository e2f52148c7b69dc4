"""Text data for language-model training: sources by name, sequence packing, a resumable loader
(`PackedStream`, which a loader of other documents, e.g. moma's image-caption pairs, subclasses), and pre-tokenised
datasets (`prepared`: `tokens:DIR`, written once by experiments.prepare_data, read by `PreparedTokensLoader`).

Image–caption sources (`image_sources`: `get_image_source`, the `image_captions:` text source) share the same
pieces: one `SourceRegistry` per kind (`registry`), random-access views and the epoch order (`views`), TFDS records
(`tfds_records`) and train/validation splits (`splits`).

Light to import: TensorFlow Datasets is imported only when a TFDS-backed source (builtin, tfds:) is opened.

    source = get_text_source("builtin")             # or "files:corpus/*.txt", "tfds:lm1b"
    loader = LMDataLoader(source.split("train"), tokenizer, seq_len=256, global_batch_size=32, seed=0)
    batch = loader.next()                           # dict of numpy arrays; loader.state() -> checkpoint
"""

from lm_core.data.loader import LMDataLoader, iter_eval_batches
from lm_core.data.packing import BATCH_KEYS, PackCursor, PackedBatch, TokenizedDocument, pack_documents, pack_rows
from lm_core.data.prepared import PreparedTokensLoader, iter_prepared_eval_batches, open_prepared
from lm_core.data.sources import TextSource, get_text_source, register_text_source
from lm_core.data.stream import PackedStream

__all__ = ["BATCH_KEYS", "LMDataLoader", "PackCursor", "PackedBatch", "PackedStream", "PreparedTokensLoader",
           "TextSource", "TokenizedDocument", "get_text_source", "iter_eval_batches",
           "iter_prepared_eval_batches", "open_prepared", "pack_documents", "pack_rows", "register_text_source"]
