"""A small, readable BERT whose upper layers cross-attend to image tokens — X-VLM's text and fusion encoder.

Layers [0, fusion_layer) encode text alone; layers [fusion_layer, N) add a cross-attention block after self-attention
(X-VLM's "cross-modal encoder"). Parameter names follow the official `xbert.py` (and so HuggingFace BERT), which keeps
official checkpoints loadable by name. We own this code instead of subclassing transformers so that numerics and key
names do not move with transformers releases.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig

# The official code masks with (1 - mask) * -10000 rather than -inf; keep it for bit-level parity on padded batches.
MASK_VALUE = -10000.0


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0/1 keep-mask -> additive mask for attention logits: [B, L] (keys) -> [B, 1, 1, L]; [B, L, L] (query x key,
    packed texts) -> [B, 1, L, L]."""
    mask = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]
    return (1.0 - mask.to(dtype)) * MASK_VALUE


@dataclass
class PackedText:
    """Several texts as one sequence without padding: each token is a row of the same matmuls, and a block-diagonal
    mask keeps attention within each text. N phrases then cost the sum of their lengths, not N x the longest (a
    third less for the benchmark's 8 phrases); per text, the numbers are those of the padded batch."""
    input_ids: torch.Tensor       # [1, n]  the texts' tokens, back to back
    position_ids: torch.Tensor    # [1, n]  positions restart at each text
    attention_mask: torch.Tensor  # [1, n, n] 0/1: token i may attend to token j (same text)
    starts: torch.Tensor          # [P]     where each text ([CLS]) begins

    @classmethod
    def of(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> "PackedText":
        keep = attention_mask.bool()
        lengths = keep.sum(dim=1)
        text_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        positions = torch.arange(len(text_of_token), device=lengths.device) - starts[text_of_token]
        same_text = (text_of_token[:, None] == text_of_token[None, :]).long()
        return cls(input_ids[keep][None], positions[None], same_text[None], starts)

    def firsts(self, hidden: torch.Tensor) -> torch.Tensor:
        """Each text's [CLS] row as a length-1 sequence [P, 1, H]: what heads that read `[:, 0]` expect."""
        return hidden[0, self.starts][:, None]


@dataclass
class ImageContext:
    """Image tokens that several texts attend to: each image's patches once, plus one [CLS] per text (the image's or a
    concept's). Cross-attention projects the patches once per image instead of once per text — with 4 phrases and 2
    hard negatives per image in training, or many phrases on one image at inference, that is most of the fusion cost.
    """
    cls: torch.Tensor        # [P, C]    token 0 seen by text p
    patches: torch.Tensor    # [B, N, C] patch tokens per image
    index: torch.Tensor      # [P]       image row of text p
    shared: bool = False     # every text sees image 0 with the same [CLS] (inference: N phrases, one image)

    @classmethod
    def single(cls, tokens: torch.Tensor, n_texts: int) -> "ImageContext":
        """One image's [1, 1+N, C] tokens shared by n texts."""
        return cls(tokens[:, 0].expand(n_texts, -1), tokens[:, 1:], torch.zeros(n_texts, dtype=torch.long,
                                                                                 device=tokens.device), shared=True)

    def select(self, rows: torch.Tensor) -> "ImageContext":
        return ImageContext(self.cls[rows], self.patches, self.index[rows], self.shared)

    def __len__(self) -> int:
        return len(self.cls)

    def slots(self) -> tuple[torch.Tensor, int]:
        """Each text's position among the texts of its image, and the most texts any image has."""
        order = torch.argsort(self.index, stable=True)
        counts = torch.bincount(self.index, minlength=self.patches.shape[0])
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(self.index)
        slot[order] = torch.arange(len(self.index), device=self.index.device) - starts[self.index[order]]
        return slot, int(counts.max()) if len(counts) else 0

    @staticmethod
    def cat(contexts: list["ImageContext"]) -> "ImageContext":
        base = contexts[0]
        assert all(c.patches is base.patches for c in contexts), "contexts must share their patches"
        return ImageContext(torch.cat([c.cls for c in contexts]), base.patches, torch.cat([c.index for c in contexts]))


@dataclass(frozen=True)
class FusionKeysValues:
    """One image's cross-attention keys and values in every fusion layer, `layers[i]` = (K, V) of fusion layer i,
    each [1, heads, 1+N, head_dim]: what all texts querying that image share. Computed by `BertModel.image_keys_values`
    and passed to `fuse(keys_values=)`, so a caller that keeps it (the Grounder's image cache) skips the per-layer
    projections on later queries (at base size 11-16 ms of a 55-61 ms cached phrase, benchmarks/RESULTS.md)."""
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[i]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.layers for t in kv)


@dataclass(frozen=True)
class FusionOutput:
    """`fuse(..., return_attention=layer)`: the fused hidden states and that layer's cross-attention probabilities
    [B, heads, T, 1+N] (softmax over the image tokens, before dropout), part of the autograd graph."""
    hidden: torch.Tensor
    attention: torch.Tensor


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
             + self.position_embeddings(position_ids))
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head attention; `kv_width` differs from the hidden size for cross-attention to image tokens.

    `forward` returns the output, or (output, attention probabilities) with `need_weights` (Grad-CAM and the
    attention-guidance loss read them; everything else takes the fused kernel)."""

    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L, kv_width] -> this attention's keys and values, [B, heads, L, head_dim] each."""
        return self._heads(self.key(tokens)), self._heads(self.value(tokens))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None,
                context: torch.Tensor | ImageContext | None = None,
                keys_values: tuple[torch.Tensor, torch.Tensor] | None = None,
                need_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`keys_values`: the image's (K, V) computed before (`keys_values(tokens)`), only with a shared
        ImageContext and no mask."""
        context = hidden if context is None else context
        if isinstance(context, ImageContext):
            if context.shared and mask is None and not need_weights:
                return self._attend_one_image(hidden, context, keys_values)
            if keys_values is not None:
                raise ValueError("keys_values serve one shared, unmasked image without attention weights")
            out, probs = self._attend_per_image(hidden, context, mask)
            return (out, probs) if need_weights else out
        if keys_values is not None:
            raise ValueError("keys_values go with a shared ImageContext")
        k, v = self.keys_values(context)
        q = self._heads(self.query(hidden))
        dropout = self.dropout_p if self.training else 0.0
        if not need_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype),
                                                 dropout_p=dropout)
            return out.transpose(1, 2).flatten(2)
        scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5
        probs = (scores if mask is None else scores + mask).softmax(dim=-1)
        out = F.dropout(probs, dropout, self.training) @ v
        return out.transpose(1, 2).flatten(2), probs

    def _attend_per_image(self, hidden: torch.Tensor, image: ImageContext,
                          mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts attending to their own image's patches (and their own [CLS]), with each image's keys/values computed
        once and never copied per text: the texts of one image are stacked as query rows of one matmul. Training has
        ~15 texts per image (concepts, ITM negatives, MLM), so per-text copies of the keys/values and their backward
        were half the step time. Equals attention over [cls_p, patches[index_p]] with `mask` [P, 1, 1, 1+N]."""
        P, T, _ = hidden.shape
        h, d = self.num_heads, self.head_dim
        B, N = image.patches.shape[:2]
        slot, width = image.slots()
        q = self._heads(self.query(hidden)) / d ** 0.5                                     # [P, h, T, d]
        k_cls, v_cls = (proj(image.cls).view(P, h, 1, d) for proj in (self.key, self.value))
        k_img, v_img = self.keys_values(image.patches)                                     # [B, h, N, d]
        grouped = q.new_zeros(B, h, width, T, d)
        grouped[image.index, :, slot] = q
        patch_scores = (grouped.view(B, h, width * T, d) @ k_img.transpose(-1, -2)).view(B, h, width, T, N)
        scores = torch.cat([q @ k_cls.transpose(-1, -2), patch_scores[image.index, :, slot]], dim=-1)  # [P,h,T,1+N]
        weights = (scores if mask is None else scores + mask).softmax(dim=-1)             # returned before dropout
        probs = F.dropout(weights, self.dropout_p, self.training)
        grouped_probs = probs.new_zeros(B, h, width, T, N)
        grouped_probs[image.index, :, slot] = probs[..., 1:]
        out_img = (grouped_probs.view(B, h, width * T, N) @ v_img).view(B, h, width, T, d)[image.index, :, slot]
        out = probs[..., :1] * v_cls + out_img                                              # [P, h, T, d]
        return out.transpose(1, 2).flatten(2), weights

    def _attend_one_image(self, hidden: torch.Tensor, image: ImageContext,
                          keys_values: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """All texts attend to the same unmasked image: its keys/values once (or as given), and every text's queries
        as rows of one attention call (each row's softmax is over the same keys, so this equals the per-text form)
        instead of P copies of the image's keys and values."""
        if keys_values is None:
            keys_values = self.keys_values(torch.cat([image.cls[:1, None], image.patches[:1]], dim=1))  # [1,h,1+N,d]
        k, v = keys_values
        q = self._heads(self.query(hidden))                                                  # [P, h, T, d]
        P, h, T, d = q.shape
        q = q.transpose(0, 1).reshape(1, h, P * T, d)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0)
        return out.reshape(h, P, T, d).permute(1, 2, 0, 3).flatten(2)                        # [P, T, h*d]


class BertAttentionOutput(nn.Module):
    """Projection + dropout + residual + LayerNorm (post-LN, as BERT). Also the FFN's output block."""

    def __init__(self, in_width: int, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width)
        self.output = BertAttentionOutput(cfg.hidden_size, cfg)

    def forward(self, hidden, mask, context=None, keys_values=None, need_weights: bool = False):
        """The block's output, or (output, attention probabilities) with `need_weights` (`BertSelfAttention`)."""
        if not need_weights:
            return self.output(self.self(hidden, mask, context, keys_values), hidden)
        out, probs = self.self(hidden, mask, context, keys_values, need_weights=True)
        return self.output(out, hidden), probs


class BertIntermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact erf GELU, as BERT's "gelu"


class BertLayer(nn.Module):
    def __init__(self, cfg: TextConfig, image_width: int | None):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.hidden_size)
        if image_width is not None:
            self.crossattention = BertAttention(cfg, image_width)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertAttentionOutput(cfg.intermediate_size, cfg)

    @property
    def is_fusion(self) -> bool:
        return hasattr(self, "crossattention")

    def forward(self, hidden, mask, image=None, image_mask=None, rows: torch.Tensor | None = None,
                keys_values=None, need_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`rows`: compute only these token positions (queries), attending over all of `hidden`. `keys_values`,
        `need_weights`: of the cross-attention (`BertSelfAttention.forward`); with `need_weights` the result is
        (hidden, cross-attention probabilities)."""
        if rows is None:
            hidden = self.attention(hidden, mask)
        else:
            mask = mask if mask.shape[-2] == 1 else mask[:, :, rows]     # packed texts: one mask row per query
            hidden = self.attention(hidden[:, rows], mask, hidden)
        if not self.is_fusion:
            return self.output(self.intermediate(hidden), hidden)
        if not need_weights:
            hidden = self.crossattention(hidden, image_mask, image, keys_values)
            return self.output(self.intermediate(hidden), hidden)
        hidden, probs = self.crossattention(hidden, image_mask, image, keys_values, need_weights=True)
        return self.output(self.intermediate(hidden), hidden), probs


class BertEncoder(nn.Module):
    def __init__(self, cfg: TextConfig, image_width: int):
        super().__init__()
        self.layer = nn.ModuleList(
            [BertLayer(cfg, image_width if i >= cfg.fusion_layer else None) for i in range(cfg.num_hidden_layers)])


class BertModel(nn.Module):
    """Text encoder (`encode_text`) and cross-modal fusion encoder (`fuse`) sharing one stack of layers."""

    def __init__(self, cfg: TextConfig, image_width: int):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg, image_width)

    @property
    def fusion_layers(self) -> list[BertLayer]:
        return list(self.encoder.layer[self.config.fusion_layer:])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Text layers; `attention_mask` [B, L] (padded batch) or [B, L, L] with `position_ids` (PackedText)."""
        hidden = self.embeddings(input_ids, position_ids)
        mask = additive_mask(attention_mask, hidden.dtype)
        for layer in self.encoder.layer[: self.config.fusion_layer]:
            hidden = layer(hidden, mask)
        return hidden

    def image_keys_values(self, image_tokens: torch.Tensor) -> FusionKeysValues:
        """One image's [1, 1+N, C] tokens -> every fusion layer's cross-attention (K, V), for `fuse(keys_values=)`."""
        tokens = image_tokens.contiguous()
        return FusionKeysValues(tuple(layer.crossattention.self.keys_values(tokens) for layer in self.fusion_layers))

    def fuse(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor | ImageContext,
             image_mask: torch.Tensor | None = None, last_rows: torch.Tensor | None = None,
             keys_values: FusionKeysValues | None = None,
             return_attention: int | None = None) -> torch.Tensor | FusionOutput:
        """Fusion layers over text; `image` is [B, 1+N, C] tokens or an ImageContext; `image_mask` [B, 1+N] 0/1
        restricts cross-attention to a concept's patches (None: the whole image). `last_rows`: token positions the
        last layer computes (the ITM and bbox heads read only [CLS]); the output is then [B, len(last_rows), H].
        `keys_values`: the image's cross-attention keys/values from `image_keys_values` (with a shared ImageContext
        made from the same tokens; None: projected here). `return_attention`: a BERT layer index (a fusion layer;
        negative counts from the end); the result is then a FusionOutput that also holds that layer's
        cross-attention probabilities (that layer computes them with an explicit softmax, not the fused kernel)."""
        mask = additive_mask(attention_mask, text_embeds.dtype)
        if image_mask is not None:
            image_mask = additive_mask(image_mask, text_embeds.dtype)
        layers = self.fusion_layers
        if keys_values is not None and len(keys_values) != len(layers):
            raise ValueError(f"keys_values holds {len(keys_values)} layers; the model has {len(layers)} fusion layers")
        wanted = None
        if return_attention is not None:
            n = self.config.num_hidden_layers
            index = return_attention + n if return_attention < 0 else return_attention
            if not self.config.fusion_layer <= index < n:
                raise ValueError(f"return_attention must be a fusion layer in [{self.config.fusion_layer}, {n}), "
                                 f"got {return_attention}")
            wanted = index - self.config.fusion_layer
        hidden, attention = text_embeds, None
        for i, layer in enumerate(layers):
            args = (hidden, mask, image, image_mask, last_rows if i == len(layers) - 1 else None,
                    None if keys_values is None else keys_values[i])
            if i == wanted:
                hidden, attention = layer(*args, need_weights=True)
            else:
                hidden = layer(*args)
        return hidden if wanted is None else FusionOutput(hidden, attention)


class MLMHead(nn.Module):
    """BERT's masked-LM head; the decoder weight is tied to the word embeddings (as in the official model)."""

    def __init__(self, cfg: TextConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = nn.Sequential()
        self.transform.add_module("dense", nn.Linear(cfg.hidden_size, cfg.hidden_size))
        self.transform.add_module("act", nn.GELU())
        self.transform.add_module("LayerNorm", nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps))
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.word_embeddings = [word_embeddings]  # a list: tied, not a second registered copy

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(hidden), self.word_embeddings[0].weight, self.bias)
