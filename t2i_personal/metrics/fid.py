"""FID and KID between a set of generated images and a reference set, through torchmetrics.

StyleForge's protocol (the paper's evaluation section): FID between all generated images and a reference folder
(pytorch-fid's Inception); KID, reported x 10³, for styles whose reference set is a small set of artworks, with
``subset_size`` at most the reference count.

>>> fid = ImageSetDistance(feature="builtin:toy-clip")          # offline alternative; default: torchmetrics' Inception
>>> result = fid.evaluate(generated_images, "refs/anime/")     # FID and KID from one feature pass
>>> result.to_dict()                                            # {"fid": ..., "kid": ..., "kid_x1e3": ..., feature ...}

Feature extractors (``feature``):

* ``"inception"`` (default): torchmetrics' ``NoTrainInceptionV3`` (pool3, 2048-d), the torch-fidelity port of the
  TF FID Inception. It needs the ``torch-fidelity`` package **and** its weights file
  ``pt_inception-2015-12-05-6726825d.pth`` (normally downloaded on first use into torch hub's checkpoint folder);
  pass ``inception_weights=/path/to/file.pth`` where the machine is offline. Missing either gives a
  :class:`~t2i_personal.errors.ModelLoadError` that names it and the offline alternative below.
* any metric encoder :func:`~t2i_personal.metrics.load_metric_model` understands (``"builtin:toy-clip"``, an
  open_clip folder or name + ``pretrained``, a transformers DINO folder or hub id), or a loaded
  :class:`~t2i_personal.metrics.MetricModel`: its (unnormalised) image embedding is the feature;
* a ``torch.nn.Module`` taking a float batch (N, 3, ``image_size``, ``image_size``) in [0, 1] and returning (N, D).

Features are extracted once here (reference features cached by image content) and handed to torchmetrics'
``FrechetInceptionDistance`` / ``KernelInceptionDistance`` as their custom ``feature`` module (an identity over
the precomputed features), so both statistics are torchmetrics' own code. Numbers from different feature
extractors are not comparable with each other, nor with published Inception FIDs: every result records its
extractor. KID is an unbiased estimate, so it can come out slightly negative (it is negative for a set against
itself).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..errors import ModelLoadError
from .base import Metric, to_pil_list
from .loading import MetricModel, load_metric_model

INCEPTION = "inception"
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         + INCEPTION_WEIGHTS_FILE)
OFFLINE_ALTERNATIVE = ("Offline alternative: pass feature='builtin:toy-clip' (or a local DINO / open_clip folder, e.g. "
                       "feature='/models/dino-vits16'); such numbers are not comparable with Inception FIDs.")


class _Precomputed(torch.nn.Module):
    """torchmetrics' custom ``feature`` module over features that are already computed (an identity)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@dataclass
class DistanceResult:
    """FID and/or KID of one generated set against one reference set, with what was computed (``info``)."""

    fid: float | None
    kid: float | None
    kid_std: float | None
    count_generated: int
    count_reference: int
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {**self.info, "count_generated": self.count_generated, "count_reference": self.count_reference}
        if self.fid is not None:
            out["fid"] = self.fid
        if self.kid is not None:
            out.update(kid=self.kid, kid_std=self.kid_std, kid_x1e3=self.kid * 1e3, kid_std_x1e3=self.kid_std * 1e3)
        return out


class ImageSetDistance(Metric):
    """FID / KID between generated images and a reference set; see the module docstring.

    ``kid_subset_size`` (torchmetrics' ``subset_size``, default 1000) is clamped to the smaller of the two set sizes
    (torchmetrics refuses a larger one); the value used and the clamping are recorded in :meth:`describe`.
    ``kid_subsets``: how many random subsets KID averages (torchmetrics' default 100); ``seed`` makes them repeatable.
    """

    name = "FID/KID"
    needs_references = True

    def __init__(self, feature: str | os.PathLike | MetricModel | torch.nn.Module = INCEPTION, *,
                 pretrained: str | None = None, inception_weights: str | os.PathLike | None = None,
                 image_size: int = 299, kid_subset_size: int = 1000, kid_subsets: int = 100, seed: int = 0,
                 batch_size: int = 32, progress: bool = True, device: str | torch.device | None = None,
                 allow_pickle: bool = False):
        super().__init__(batch_size=batch_size, progress=progress)
        if kid_subset_size < 1 or kid_subsets < 1:
            raise ValueError("kid_subset_size and kid_subsets must be at least 1")
        self.kid_subset_size, self.kid_subsets, self.seed = kid_subset_size, kid_subsets, seed
        self.image_size = image_size
        self.device = torch.device(device or "cpu")
        self._last_subset: int | None = None
        self.metric_model: MetricModel | None = None
        self.module: torch.nn.Module | None = None
        if isinstance(feature, torch.nn.Module):
            self.kind = "module"
            self.module = feature.to(self.device).eval()
            self.feature_info = {"feature_extractor": f"custom module {type(feature).__name__}",
                                 "input": f"float [0, 1], resized to {image_size}x{image_size} (bicubic)"}
        elif isinstance(feature, str) and feature == INCEPTION:
            self.kind = INCEPTION
            self.module = _load_inception(inception_weights).to(self.device)
            self.feature_info = {"feature_extractor": "torchmetrics NoTrainInceptionV3 (torch-fidelity "
                                                      "inception-v3-compat), pool3 2048-d",
                                 "input": "uint8 at the image's size; the network resizes to 299x299 (bilinear)"}
        else:
            model = feature if isinstance(feature, MetricModel) else load_metric_model(
                feature, pretrained=pretrained, device=self.device, allow_pickle=allow_pickle)
            self.kind = model.library
            self.metric_model = model
            info = model.describe()
            what = ("open_clip encode_image, unnormalised" if model.library == "open_clip" else
                    "image embeds (get_image_features)" if hasattr(model.model, "get_image_features") else
                    "last_hidden_state[:, 0] ([CLS]), unnormalised")
            self.feature_info = {"feature_extractor": f"{info['backbone']} ({what})",
                                 "feature_pretrained": info["pretrained"],
                                 "input": "the model's own preprocessing" if model.preprocess is not None else
                                 "resize 256 -> center-crop 224, ImageNet mean/std"}

    # ----------------------------------------------------------------------------------------------------- features

    @torch.no_grad()
    def _embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        if self.kind == INCEPTION:
            # uint8 at the image's own size (the network resizes to 299 itself, as pytorch-fid does); images of
            # different sizes go through in separate same-size groups, so batching never changes a feature
            out: list[torch.Tensor | None] = [None] * len(images)
            for size in dict.fromkeys(im.size for im in images):
                rows = [i for i, im in enumerate(images) if im.size == size]
                pixels = torch.stack([TF.pil_to_tensor(images[i]) for i in rows]).to(self.device)
                for i, f in zip(rows, self.module(pixels).double().cpu()):
                    out[i] = f
            return torch.stack(out)
        if self.kind == "module":
            pixels = torch.stack([TF.to_tensor(_square(im, self.image_size)) for im in images])
            return self.module(pixels.to(self.device)).double().cpu()
        mm = self.metric_model
        if mm.library == "open_clip":
            pixels = torch.stack([mm.preprocess(im) for im in images]).to(mm.device)
            return mm.model.encode_image(pixels).double().cpu()
        if mm.preprocess is not None:
            pixels = mm.preprocess(images=images, return_tensors="pt")["pixel_values"]
        else:
            from .dino import IMAGENET_MEAN, IMAGENET_STD

            mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
            pixels = torch.stack([(TF.to_tensor(TF.center_crop(TF.resize(im, 256, InterpolationMode.BICUBIC),
                                                               [224, 224])) - mean) / std for im in images])
        pixels = pixels.to(mm.device, torch.float32)
        if hasattr(mm.model, "get_image_features"):
            out = mm.model.get_image_features(pixel_values=pixels)
            out = getattr(out, "pooler_output", out)
        else:
            out = mm.model(pixel_values=pixels).last_hidden_state[:, 0]
        return out.double().cpu()

    def features(self, images) -> torch.Tensor:
        """(N, D) float64 features of ``images`` (any form :func:`to_pil_list` takes), not cached."""
        return self._batched(to_pil_list(images), self._embed_images, self.name)

    # ------------------------------------------------------------------------------------------------------ metrics

    def evaluate(self, images, references=None, *, metrics: tuple[str, ...] = ("fid", "kid")) -> DistanceResult:
        """FID and/or KID (``metrics``) of ``images`` against ``references`` (a folder or any image list)."""
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        unknown = set(metrics) - {"fid", "kid"}
        if unknown or not metrics:
            raise ValueError(f"metrics must be a non-empty subset of ('fid', 'kid'), not {metrics!r}")
        if references is None:
            raise ValueError(f"{self.name} needs a reference image set (a folder or a list of images)")
        gen = self.features(images)
        ref = self.reference_embeddings(references).double()
        if len(gen) < 2 or len(ref) < 2:
            raise ValueError(f"{self.name} needs at least 2 generated and 2 reference images "
                             f"(got {len(gen)} and {len(ref)})")
        fid = kid = kid_std = None
        dim = gen.shape[1]
        if "fid" in metrics:
            m = FrechetInceptionDistance(feature=_Precomputed(dim))
            m.update(ref, real=True)
            m.update(gen, real=False)
            fid = float(m.compute())
        if "kid" in metrics:
            self._last_subset = min(self.kid_subset_size, len(ref), len(gen))
            with warnings.catch_warnings():  # "KID will save all extracted features": they are already in memory
                warnings.simplefilter("ignore", UserWarning)
                m = KernelInceptionDistance(feature=_Precomputed(dim), subsets=self.kid_subsets,
                                            subset_size=self._last_subset)
            m.update(ref, real=True)
            m.update(gen, real=False)
            state = torch.random.get_rng_state()
            torch.manual_seed(self.seed)  # KID's random subsets
            try:
                mean, std = m.compute()
            finally:
                torch.random.set_rng_state(state)
            kid, kid_std = float(mean), float(std)
        return DistanceResult(fid, kid, kid_std, len(gen), len(ref), self.describe())

    def __call__(self, images, prompts=None, references=None) -> torch.Tensor:
        """FID of ``images`` against ``references`` as a 0-d tensor (use :meth:`evaluate` for KID too)."""
        return torch.tensor(self.evaluate(images, references, metrics=("fid",)).fid)

    def fid(self, images, references) -> float:
        return self.evaluate(images, references, metrics=("fid",)).fid

    def kid(self, images, references) -> tuple[float, float]:
        """KID mean and standard deviation over the random subsets (raw; x 10³ is the usual report)."""
        result = self.evaluate(images, references, metrics=("kid",))
        return result.kid, result.kid_std

    def describe(self) -> dict:
        info = {"metric": "FID/KID", "library": "torchmetrics", **self.feature_info,
                "kid_subsets": self.kid_subsets, "kid_subset_size_requested": self.kid_subset_size,
                "scale": "FID raw; KID raw (kid_x1e3 = KID x 10^3, as usually reported)"}
        if self._last_subset is not None:
            info["kid_subset_size"] = self._last_subset
            if self._last_subset < self.kid_subset_size:
                info["note"] = (f"KID subset_size clamped from {self.kid_subset_size} to {self._last_subset} "
                                "(the smaller of the reference and generated set sizes)")
        return info


def _square(image: Image.Image, size: int) -> Image.Image:
    return image if image.size == (size, size) else image.resize((size, size), Image.BICUBIC)


def _load_inception(weights: str | os.PathLike | None) -> torch.nn.Module:
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except ImportError as exc:  # pragma: no cover - torchmetrics is a dependency
        raise ModelLoadError(f"FID/KID need torchmetrics: pip install 'torchmetrics>=1.0' ({exc})") from exc
    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModelLoadError(
            "FID/KID's default Inception feature extractor needs the torch-fidelity package (pip install "
            f"torch-fidelity) and its weights file {INCEPTION_WEIGHTS_FILE} ({INCEPTION_WEIGHTS_URL}); "
            f"torch-fidelity is not installed. {OFFLINE_ALTERNATIVE}")
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"Inception weights file {path} does not exist (expected {INCEPTION_WEIGHTS_FILE}). "
                                 f"{OFFLINE_ALTERNATIVE}")
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        if not cached.is_file() and offline:
            raise ModelLoadError(
                f"FID/KID's default Inception weights {INCEPTION_WEIGHTS_FILE} are not in torch hub's cache "
                f"({cached.parent}) and this machine is offline (HF_HUB_OFFLINE is set). Download {INCEPTION_WEIGHTS_URL} "
                f"elsewhere and pass inception_weights=/path/to/{INCEPTION_WEIGHTS_FILE} (or copy it to {cached}). "
                f"{OFFLINE_ALTERNATIVE}")
    try:
        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                  feature_extractor_weights_path=None if weights is None else str(weights)).eval()
    except Exception as exc:  # download failures come as URLError, OSError, RuntimeError, ...
        raise ModelLoadError(
            f"could not load FID/KID's Inception weights {INCEPTION_WEIGHTS_FILE}: {type(exc).__name__}: {exc}. "
            f"Download {INCEPTION_WEIGHTS_URL} and pass inception_weights=/path/to/it. {OFFLINE_ALTERNATIVE}") from exc
