"""Multi-modal fine-tuning (--clip): the records' images encoded once by a frozen CLIP, and V2's joint training.

The frozen CLIP encoder computes every image's features once, before the first step (with several processes, each
encodes its share and all gather the table); each sequence of a batch then carries its image's features, and the
model's projector (model.visual_proj, trained with the adapter, saved in the adapter file) turns them into the
visual tokens. Records without an image get none. A missing or unreadable image, one over Pillow's pixel limit, or
one that leads outside --image-root (unless --allow-external-files) stops the run before anything is written.
--joint-training: LLaMA-Adapter V2's joint training with disjoint parameters (JointTraining).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from llama_adapter_triton.model.adapter import adapter_groups, adapter_state_dict
from llama_adapter_triton.model.llama import LLaMA
from llama_adapter_triton.train.config import FinetuneConfig, UsageError
from llama_adapter_triton.train.data import DataError, Step, TokenizedDataset
from llama_adapter_triton.train.distributed import Dist


@dataclass
class ImageFeatures:
    """A multi-modal run's images: the CLIP features of each, computed once before training (the encoder is
    frozen), and which image each record has."""

    features: torch.Tensor  # (num_images, visual_dim) fp32, on the training device
    row_of_record: dict[int, int]  # record index (TokenizedDataset.source_index) -> row of features

    def rows(self, data: TokenizedDataset) -> torch.Tensor:
        """(len(data),) int64: each example's row of features, -1 for an example without an image."""
        return torch.tensor([self.row_of_record.get(i, -1) for i in data.source_index.tolist()], dtype=torch.int64)

    def attach(self, batch: dict, rows: torch.Tensor) -> dict:
        """The batch with image_features (num_seqs, visual_dim) and image_mask (num_seqs,) for the model;
        rows: self.rows(the loader's data). A filler's one row, and examples without an image, get no image."""
        seq_rows = rows[batch["example_ids"]] if len(batch["example_ids"]) else torch.full((batch["num_seqs"],), -1)
        device = self.features.device
        return {**batch, "image_features": self.features[seq_rows.clamp(min=0).to(device)],
                "image_mask": (seq_rows >= 0).to(device)}


def encode_images(config: FinetuneConfig, images: dict[int, str], dtype: torch.dtype, d: Dist,
                  say: Callable[[str], None] = print) -> tuple[ImageFeatures, tuple[int, ...]]:
    """The CLIP features of the records' images (images: record index -> file as the record gives it;
    relative to --image-root, by default the data file's folder), and the CLIP layers they come from.
    An image that leads outside --image-root ("..", an absolute path, a link) is refused unless
    --allow-external-files. With several processes each encodes every world_size-th image and all of them gather
    the whole table."""
    from llama_adapter_triton.model.visual import CLIPImageEncoder, ImageError

    def listing(items: list[str]) -> str:
        return "; ".join(items[:5]) + (f"; ... and {len(items) - 5} more" if len(items) > 5 else "")

    root = config.image_root or config.data.parent
    files: dict[Path, int] = {}  # each file once, in order of first use
    row_of_record, missing, outside = {}, [], []
    for index, image in sorted(images.items()):
        path = Path(image) if Path(image).is_absolute() else root / image
        if not path.is_file():
            missing.append(f"record {index}: {path}")
        elif not (config.allow_external_files or path.resolve().is_relative_to(root.resolve())):
            outside.append(f"record {index}: {image!r} is {path.resolve()}")
        row_of_record[index] = files.setdefault(path, len(files))
    if missing:
        raise DataError(f"{config.data}: {len(missing)} record(s) name an image file that does not exist "
                        f"(relative paths start at {root}; --image-root sets it): {listing(missing)}")
    if outside:
        raise DataError(f"{config.data}: {len(outside)} record(s) name an image outside --image-root {root} (through "
                        f"\"..\", an absolute path or a link): {listing(outside)}; refused unless you pass "
                        "--allow-external-files")
    try:
        encoder = CLIPImageEncoder(config.clip, layers=config.clip_layers, device=d.device, dtype=dtype)
    except ValueError as e:  # layers out of range, an incomplete CLIP checkpoint
        raise UsageError(f"--clip / --clip-layers: {e}") from None
    say(f"images: {len(files)} file(s) for {len(row_of_record)} record(s); CLIP {config.clip} "
        f"({encoder.depth} layers), global features of layers {', '.join(map(str, encoder.layers))}: "
        f"{encoder.feature_dim} per image, computed once")
    paths = list(files)[d.rank::d.world_size]
    features, error = None, None
    try:
        features = encoder.encode_files(paths, progress=d.main and len(files) > 64)
    except ImageError as e:  # not an image, or a decompression bomb
        records = [i for i, row in row_of_record.items() if row == files[Path(e.path)]]
        more = f" (and {len(records) - 1} more with that image)" if len(records) > 1 else ""
        error = f"{config.data}: record {records[0]}{more}: {e}"
    if d.world_size > 1:  # every rank learns of any rank's error before the gather (which would wait for ever)
        errors: list[str | None] = [None] * d.world_size
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise DataError(error)
    if d.world_size > 1:  # rank r encoded images r, r + W, ...: gather, then interleave back
        per = -(-len(files) // d.world_size)
        mine = torch.zeros(per, encoder.feature_dim, device=d.device)
        mine[:len(features)] = features
        shares = [torch.empty_like(mine) for _ in range(d.world_size)]
        dist.all_gather(shares, mine)
        features = torch.stack(shares, dim=1).flatten(0, 1)[:len(files)]
    return ImageFeatures(features, row_of_record), encoder.layers


def setup_images(config: FinetuneConfig, images: dict[int, str], train_data: TokenizedDataset, dtype: torch.dtype,
                 d: Dist, say: Callable[[str], None]) -> tuple[ImageFeatures | None, dict, np.ndarray | None]:
    """(the image features or None, the AdapterConfig fields they give, each train example's kind for
    --joint-training or None). images: load_data's; refused without --clip, and --clip without images."""
    if images and config.clip is None:
        raise UsageError(f"{len(images)} record(s) of {config.data} have an \"image\": pass --clip (a local CLIP "
                         "model folder) for multi-modal fine-tuning, or remove their images for a text-only adapter")
    if config.clip is not None and not images:
        raise UsageError(f"--clip: no record of {config.data} has an \"image\" to encode")
    image_features, visual = None, {}
    if config.clip is not None:
        image_features, clip_layers = encode_images(config, images, dtype, d, say)
        visual = dict(visual_dim=image_features.features.shape[1], clip_layers=clip_layers)
    train_rows = image_features.rows(train_data) if image_features is not None else None
    kinds = None
    if config.joint_training:  # 0: text records, 1: image records
        kinds = (train_rows >= 0).numpy().astype(np.int64)
        if kinds.all() or not kinds.any():
            raise UsageError(f"--joint-training trains the visual side on image records and the rest on text records; "
                             f"the training examples of {config.data} are all {'image' if kinds.all() else 'text'} "
                             "records")
    return image_features, visual, kinds


class JointTraining:
    """LLaMA-Adapter V2's joint training with disjoint parameters (arXiv 2304.15010, sec. 4.2): image records train the
    "visual" group of model.adapter_groups (the projector, the early-fusion gates), text records the "language" group
    (the adaption prompts and their gates, V2's biases, scales and norms).

    The loaders keep each micro-batch to one kind (kinds: 0 text, 1 image). route() divides a micro-batch's loss by
    its kind's targets in the step, and gradient hooks on the parameters zero the other group's share before it is
    accumulated (so DDP reduces each group's own gradients); drop_absent() leaves a group whose kind has no target in
    a step without a gradient, so that AdamW does not move it (no momentum step, no decay) in that step."""

    GROUPS = ("language", "visual")  # by kind

    def __init__(self, model: LLaMA) -> None:
        state = adapter_state_dict(model)
        self.params = [[state[name] for name in adapter_groups(model)[group]] for group in self.GROUPS]
        self.active = -1
        self.handles = [p.register_hook(lambda grad, kind=kind: grad if self.active == kind else torch.zeros_like(grad))
                        for kind, params in enumerate(self.params) for p in params]

    def size(self, kind: int) -> int:
        return sum(p.numel() for p in self.params[kind])

    def route(self, batch: dict, step: Step) -> int:
        """Make the micro-batch's backward reach its kind's group only; returns its loss's divisor."""
        self.active = batch["kind"]
        return step.kind_targets.get(batch["kind"]) or 1  # a filler (kind -1): no target, no gradient

    def drop_absent(self, step: Step) -> None:
        for kind, params in enumerate(self.params):
            if not step.kind_targets.get(kind):
                for p in params:
                    p.grad = None

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

