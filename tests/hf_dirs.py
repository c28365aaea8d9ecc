"""Tiny Hugging Face model directories, written here as ``save_pretrained`` writes them.

``save_tiny_bert(folder)`` saves a random 2-layer ``BertModel`` (``model.safetensors``, no
classifier, with a pooler) and its WordPiece tokenizer (``num_labels=N``: a
``BertForSequenceClassification`` with a saved ``N``-way classifier instead);
``save_tiny_llama(folder)`` a random 2-layer ``LlamaForCausalLM`` with tied embeddings and a
word-level tokenizer (at ``rope_theta``; a large ``initializer_range`` makes attention, and so
RoPE, matter). Both need torch (the ``parity`` extra of the test install). The vocabularies
cover :data:`WORDS`.
"""

from pathlib import Path

WORDS = ("good great fine happy love nice bad awful sad poor hate ugly the a film book was "
         "is it this very not and story plot day").split()


def save_tiny_bert(folder, *, pooler: bool = True, num_labels=None) -> Path:
  import torch
  import transformers
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(WORDS)
  (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
  tokenizer = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
  tokenizer.save_pretrained(folder)
  torch.manual_seed(0)
  config = transformers.BertConfig(
      vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, **({} if num_labels is None else
                                           {"num_labels": num_labels}))
  if num_labels is not None:  # a fine-tuned classifier checkpoint (always with its pooler)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
  else:
    transformers.BertModel(config, add_pooling_layer=pooler).save_pretrained(folder)
  return folder


def save_tiny_llama(folder, *, rope_theta: float = 10000.0,
                    initializer_range: float = 0.02) -> Path:
  import torch
  import transformers
  from tokenizers import Tokenizer, models, pre_tokenizers
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + list(WORDS))}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
      pad_token="</s>")
  tokenizer.save_pretrained(folder)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
      rope_theta=rope_theta, initializer_range=initializer_range)
  transformers.LlamaForCausalLM(config).save_pretrained(folder)
  return folder
