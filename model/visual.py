"""The multi-modal LLaMA-Adapter (arXiv 2303.16199, "multi-modal reasoning"): an image as one visual token.

A frozen CLIP image encoder gives the global feature (the class token through CLIP's post_layernorm) of several of
its layers, the multi-scale features I_1 .. I_M; they are concatenated and a small learned MLP projects them to the
model's width, one visual token per image:

    I_p = fc2(gelu(fc1([I_1; ...; I_M])))        (dim,)

I_p is added to every prompt P_l of every adapted layer, so the prompt keys and values become per sample
(model/adapter.py's `visual` hook); the zero-init gates still start the model as the pre-trained one.

    encoder = CLIPImageEncoder("clip-vit-large-patch14/", layers=(6, 12, 18, 24), device="cuda")
    features = encoder.encode_files(["cat.jpg"])                    # (1, 4 * 1024) fp32
    adapter = AdapterConfig(visual_dim=encoder.feature_dim, clip_layers=encoder.layers)
    model = load_checkpoint("llama-7b/", adapter=adapter)           # gets model.visual_proj (trained)
    logits = model(tokens, image_features=features)                 # = model(tokens, visual=model.visual_proj(f))

The encoder is Hugging Face's CLIPVisionModel and CLIPImageProcessor, read from a local folder (nothing is fetched);
layers count from 1, negative numbers from the top, and the adapter file records them. QueryProjector is the official
V2 release's projection (learned queries through ViT blocks over every CLIP token), built to import that release.
More (the layers, V2's several tokens per image): docs/finetuning.md (Multi-modal) and docs/checkpoints.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama_adapter_triton.kernels.checks import is_int


class VisualProjector(nn.Module):
    """The learned projection of the concatenated CLIP features to visual tokens: fc2(gelu(fc1(x))), fc2 giving
    `tokens` tokens of width dim (one, the paper's V1; several for V2's early fusion)."""

    def __init__(self, in_dim: int, hidden: int, dim: int, tokens: int = 1) -> None:
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.fc1 = nn.Linear(in_dim, hidden, dtype=torch.float32)
        self.fc2 = nn.Linear(hidden, dim * tokens, dtype=torch.float32)

    def reset_parameters(self) -> None:
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(rows, in_dim) features -> (rows, dim) visual tokens for one token, (rows, tokens, dim) for several; fp32."""
        out = self.fc2(F.gelu(self.fc1(features.to(self.fc1.weight.dtype))))
        return out if self.tokens == 1 else out.view(-1, self.tokens, self.dim)


class _ViTBlock(nn.Module):
    """A pre-norm ViT block as timm 0.3's vision_transformer.Block (LayerNorm eps 1e-5, qkv with bias, 4x GELU MLP),
    whose names (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2) the official V2 release's files use."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.attn.qkv(self.norm1(x)).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, C / heads)
        x = x + self.attn.proj(y.transpose(1, 2).reshape(B, N, C))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class QueryProjector(nn.Module):
    """The official LLaMA-Adapter V2 release's visual projection (llama_adapter_v2_multimodal7b, BIAS-7B), built to
    import it: CLIP's tokens (rows, n, clip_dim) -> clip_proj, LayerNorm -> [visual_query (queries, width); them]
    -> depth ViT blocks -> the first `queries` -> proj, LayerNorm -> (rows, queries, dim) visual tokens, fp32."""

    def __init__(self, clip_dim: int, width: int, depth: int, heads: int, queries: int, dim: int) -> None:
        super().__init__()
        self.clip_proj, self.clip_proj_norm = nn.Linear(clip_dim, width), nn.LayerNorm(width)
        self.visual_query = nn.Parameter(torch.empty(queries, width))
        self.blocks = nn.ModuleList(_ViTBlock(width, heads) for _ in range(depth))
        self.proj, self.proj_norm = nn.Linear(width, dim), nn.LayerNorm(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.LayerNorm)):
                m.reset_parameters()
        nn.init.normal_(self.visual_query)  # the official code's nn.Embedding

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(rows, n, clip_dim) CLIP tokens -> (rows, queries, dim)."""
        x = self.clip_proj_norm(self.clip_proj(tokens.to(self.clip_proj.weight.dtype)))
        x = torch.cat([self.visual_query.expand(len(x), -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.proj_norm(self.proj(x[:, :len(self.visual_query)]))


def default_clip_layers(depth: int) -> tuple[int, ...]:
    """Four evenly spaced layers ending with the last: (6, 12, 18, 24) for depth 24; fewer for shallow encoders."""
    return tuple(sorted({max(1, depth * i // 4) for i in range(1, 5)}))


def _normalise_layers(layers: Sequence[int], depth: int) -> tuple[int, ...]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise ValueError(f"layers must be a non-empty sequence of layer numbers, got {layers!r}")
    out = []
    for layer in layers:
        if not is_int(layer) or not (1 <= abs(layer) <= depth):
            raise ValueError(f"layers must be in 1..{depth} (or -{depth}..-1 from the top) for this {depth}-layer "
                             f"encoder, got {layer!r}")
        out.append(layer if layer > 0 else depth + 1 + layer)
    if len(set(out)) != len(out):
        raise ValueError(f"layers must not repeat a layer, got {tuple(layers)} (= {tuple(out)})")
    return tuple(out)


class CLIPImageEncoder:
    """A frozen CLIP image encoder from a local folder: images -> concatenated global features (see the docstring).

    Arguments:
        path: a folder with a CLIP (vision) model's config.json, its weights (safetensors preferred) and
            preprocessor_config.json.
        layers: the layers whose global features are concatenated, in this order; None: default_clip_layers.
        device, dtype: where the encoder runs and in which dtype on a GPU (bf16 is fine; on a CPU it runs in
            fp32); features come out fp32.
        tokens: instead, every token of the last layer through CLIP's post_layernorm and its visual projection,
            (n_tokens, projection_dim) per image: what the official V2 release's projector reads (QueryProjector;
            OpenAI CLIP's ln_post on all tokens, then @ proj). Needs the projection's weights (a whole CLIP model,
            or CLIPVisionModelWithProjection); layers is then the last one.
    """

    def __init__(self, path: str | os.PathLike, *, layers: Sequence[int] | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, tokens: bool = False) -> None:
        from transformers import CLIPImageProcessor, CLIPVisionModel, CLIPVisionModelWithProjection
        from transformers.utils import logging as hf_logging

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: not a CLIP model folder (no config.json); give the folder of a "
                                    "local CLIP model, e.g. a download of openai/clip-vit-large-patch14")
        if not (folder / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{folder}: has no preprocessor_config.json (CLIP's image preprocessing)")
        self.path = folder
        self.device = torch.device(device)
        self.dtype = dtype if self.device.type == "cuda" else torch.float32
        # a whole CLIP model's text tower is "unexpected" here: no report of it; a missing vision tensor is an error
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            kind = CLIPVisionModelWithProjection if tokens else CLIPVisionModel
            self.model, info = kind.from_pretrained(folder, local_files_only=True, output_loading_info=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        if info.get("missing_keys") or info.get("mismatched_keys"):
            bad = sorted(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
            raise ValueError(f"{folder}: the weights lack or mismatch {len(bad)} tensor(s) of the CLIP vision model, "
                             f"e.g. {bad[:3]}: not a complete CLIP checkpoint")
        self.model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        self.depth = self.model.config.num_hidden_layers
        self.tokens = tokens
        if tokens:
            self.layers = _normalise_layers((self.depth,) if layers is None else layers, self.depth)
            if self.layers != (self.depth,):
                raise ValueError(f"tokens=True reads the last layer ({self.depth}), got layers {tuple(layers)}")
            self.feature_dim = self.model.config.projection_dim
        else:
            self.layers = _normalise_layers(default_clip_layers(self.depth) if layers is None else layers, self.depth)
            self.feature_dim = len(self.layers) * self.model.config.hidden_size

    @classmethod
    def for_adapter(cls, path: str | os.PathLike, adapter, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> CLIPImageEncoder:
        """The encoder of the features a multi-modal AdapterConfig was trained on (its clip_layers, or CLIP's tokens
        for the "query" projector); ValueError when path's CLIP gives features of another width."""
        tokens = adapter.projector == "query"
        encoder = cls(path, layers=None if tokens else adapter.clip_layers, device=device, dtype=dtype, tokens=tokens)
        if encoder.feature_dim != adapter.visual_dim:
            raise ValueError(f"{path} gives {encoder.feature_dim} features per image{' token' if tokens else ''}, the "
                             f"adapter was trained on {adapter.visual_dim}: not the CLIP model it was trained with")
        return encoder

    @torch.no_grad()
    def encode(self, images: Sequence) -> torch.Tensor:
        """PIL images (any mode; converted to RGB) -> (len(images), feature_dim) fp32 features, or (len(images),
        n_tokens, feature_dim) with tokens=True."""
        if not len(images):
            raise ValueError("images must hold at least one image")
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        vision = getattr(self.model, "vision_model", self.model)  # transformers 4 nests it, 5 does not
        if self.tokens:
            last = vision(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state  # before post_layernorm
            return self.model.visual_projection(vision.post_layernorm(last)).float()
        out = self.model(pixel_values=pixels.to(self.device, self.dtype), output_hidden_states=True)
        # hidden_states[0] is the embeddings' output, hidden_states[m] block m's; CLS through post_layernorm
        cls = torch.cat([out.hidden_states[m][:, 0] for m in self.layers], dim=0)  # (M * B, width)
        cls = vision.post_layernorm(cls).float()
        return cls.view(len(self.layers), len(images), -1).transpose(0, 1).reshape(len(images), self.feature_dim)

    def encode_files(self, paths: Sequence[str | os.PathLike], *, batch_size: int = 32, workers: int = 8,
                     progress: bool = False) -> torch.Tensor:
        """Image files -> (len(paths), feature_dim) fp32 features, batch_size images at a time; up to workers
        threads read and decode the files (Pillow releases the GIL there) while the encoder runs."""
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        if batch_size < 1 or workers < 1:
            raise ValueError(f"batch_size and workers must be >= 1, got {batch_size} and {workers}")
        chunks = []
        with ThreadPoolExecutor(max_workers=workers) as pool:
            def read(start: int) -> list:  # the files of the batch at start, read in the background
                return [pool.submit(read_image, p) for p in paths[start:start + batch_size]]

            upcoming = read(0)
            for start in tqdm(range(0, len(paths), batch_size), desc="CLIP features", unit="batch",
                              disable=not progress):
                batch, upcoming = upcoming, read(start + batch_size)  # one batch ahead, no more in memory
                chunks.append(self.encode([f.result() for f in batch]))  # a bad file raises here
        return torch.cat(chunks) if chunks else torch.zeros(0, self.feature_dim, device=self.device)


class ImageError(ValueError):
    """A file that cannot be used as an image; .path is the file (as given)."""

    def __init__(self, path: str | os.PathLike, message: str) -> None:
        super().__init__(f"image {str(path)!r} {message}")
        self.path = path


def read_image(path: str | os.PathLike):
    """A PIL image, fully read; FileNotFoundError, or ImageError for a file that is not an image or has more pixels
    than Pillow's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS), before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    limit = Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as im:  # reads the header only; refuses twice the limit itself
            if limit is not None and im.width * im.height > limit:
                raise ImageError(path, f"has {im.width} x {im.height} pixels, more than the limit of {limit:,} "
                                       "(PIL.Image.MAX_IMAGE_PIXELS): a decompression bomb, or too large an image")
            im.load()
            return im
    except FileNotFoundError:
        raise FileNotFoundError(f"image {str(path)!r} does not exist") from None
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"has more pixels than twice the limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS): "
                               f"a decompression bomb, or too large an image ({e})") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(path, f"could not be read as an image: {e}") from None
