"""Checkpoints: our folder format, Meta and Hugging Face readers, conversion.

Our folder (what `save_model` writes and `load_model` reads):

    config.json                       ModelConfig.to_dict()
    model.safetensors                 every tensor under our (Meta) names, e.g. layers.0.attention.wq.weight
      or model-00001-of-0000M.safetensors ... + model.safetensors.index.json  above max_shard_size
    tokenizer.model                   SentencePiece model, when one was given (LLaMA)
      or tokenizer.json               byte-level BPE `tokenizers` file (BLOOM); a model may have more rows than it

Foreign folders, detected from their contents (`detect_format`):

    Meta          params.json + consolidated.00.pth .. consolidated.{N-1}.pth: N model-parallel shards.
                  Shard i holds rows i*out/N .. of wq/wk/wv/w1/w3/output (joined on dim 0) and columns
                  i*in/N .. of wo/w2/tok_embeddings (joined on dim 1); norms are replicated. Meta's rotary
                  layout is ours, so no permutation. `rope.freqs` is a buffer and is skipped.
    Hugging Face  config.json (model_type "llama" or "bloom") + model.safetensors | pytorch_model.bin, single or sharded
                  with *.index.json. q_proj/k_proj rows are permuted for transformers' half-split rotary:
                  per head, HF row c*(hd/2)+i holds Meta row 2i+c; `hf_tensor_to_ours` undoes it.

Every reader yields (our_key, tensor, source_file) one tensor at a time, so `convert_checkpoint` and
`load_model` hold at most one copy of the weights (a 7B model is never in memory twice): the model is
built on the `meta` device and the tensors are attached with load_state_dict(assign=True).
`iter_checkpoint_tensors` is the checked stream itself (train/deepspeed.py fills a ZeRO-3 partitioned model from it).
Each key and shape is checked against the model the config describes; a bad file is a CheckpointError
naming the file and the key. Output folders are written under a temporary name next to the target and
renamed at the end, so a failure leaves nothing half-written.

The files of this package:
    files.py      constants, CheckpointError, one-tensor-at-a-time readers of safetensors / .bin / .pth
                  (always weights_only=True), the shape checker
    hf_llama.py   the Hugging Face LLaMA <-> Meta name table and rotary permutation (both directions)
    hf_bloom.py   the Hugging Face BLOOM <-> our name table (both directions) and BLOOM's config reader
    readers.py    format detection and the readers of our, Meta's and Hugging Face folders
    writer.py     the streaming shard writer
    folder.py     save_model, load_model, iter_checkpoint_tensors, convert_checkpoint
    hf_glm.py     ChatGLM2 <-> transformers' GlmForCausalLM names (the model export's layout for ChatGLM2)
    hf_export_model.py   export_model_to_hf: a whole model -> a Hugging Face folder of its family's layout
"""

from .files import (CONFIG_NAME, DEFAULT_MAX_SHARD_SIZE, DTYPES, INDEX_NAME, TOKENIZER_JSON_NAME, TOKENIZER_NAME,
                    TOKENIZER_NAMES, WEIGHTS_NAME, CheckpointError, TensorChecker, check_tokenizer_family,
                    check_tokenizer_fits,
                    expected_shapes, folder_tokenizer, tokenizer_vocab_size)
from .hf_bloom import bloom_config_from_hf, bloom_module_to_hf, hf_bloom_key_to_ours
from .folder import convert_checkpoint, iter_checkpoint_tensors, load_model, save_model, write_model_files
from .hf_export_model import export_model_to_hf
from .hf_llama import hf_key_to_ours, hf_tensor_to_ours, ours_module_to_hf, permute_for_hf, unpermute_hf_rotary
from .readers import READERS, detect_format, open_checkpoint
from .writer import parse_size

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "INDEX_NAME", "TOKENIZER_NAME", "TOKENIZER_JSON_NAME", "TOKENIZER_NAMES",
           "folder_tokenizer", "bloom_config_from_hf", "bloom_module_to_hf", "hf_bloom_key_to_ours", "DEFAULT_MAX_SHARD_SIZE", "DTYPES",
           "CheckpointError", "TensorChecker", "expected_shapes", "tokenizer_vocab_size", "convert_checkpoint",
           "iter_checkpoint_tensors", "load_model", "save_model", "write_model_files", "check_tokenizer_fits", "check_tokenizer_family", "hf_key_to_ours", "hf_tensor_to_ours",
           "ours_module_to_hf", "permute_for_hf", "unpermute_hf_rotary", "READERS", "detect_format",
           "open_checkpoint", "parse_size", "export_model_to_hf"]
