"""A small VQ image tokenizer (Flax NNX): images -> a grid of discrete codes -> images.

Early fusion (Chameleon, MoMa) needs images as token ids: `encode` maps [B, H, W, 3] images to [B, H/f, W/f] codes
in [0, K), which become a reserved id range of the language model's vocabulary (moma.mixed_modal, which also
quantises image-caption splits: `encode_pairs`); `decode` maps codes back to pixels, so a model that generates
image tokens can show them.

Modules: `model` (VQConfig, the encoder / EMA codebook / decoder networks, VQTokenizer), `training` (the jitted
step, train_vq, code statistics), `codec` (batched encode / decode / reconstruct of host arrays, evaluate),
`storage` (save_vq / load_vq: config.json + state.npz; PNG grids of reconstructions are experiments.plots'). Every
public name is re-exported here: `from moma import vq; vq.train_vq(...)`.
"""

from moma.vq.codec import Evaluation, decode_codes, encode_images, evaluate, reconstruct_images, to_uint8
from moma.vq.model import CodebookState, Decoder, Encoder, ResBlock, VectorQuantizer, VQConfig, VQTokenizer, to_signed
from moma.vq.storage import CONFIG_FILE, STATE_FILE, load_config, load_vq, save_vq
from moma.vq.training import code_statistics, make_train_step, prng_key, train_vq

__all__ = ["CONFIG_FILE", "STATE_FILE", "CodebookState", "Decoder", "Encoder", "Evaluation", "ResBlock", "VQConfig",
           "VQTokenizer", "VectorQuantizer", "code_statistics", "decode_codes", "encode_images", "evaluate",
           "load_config", "load_vq", "make_train_step", "prng_key", "reconstruct_images", "save_vq",
           "to_signed", "to_uint8", "train_vq"]
