"""On-disk store of the Gaussian embeddings that an evaluation computes.

Each (member, text kind, list of texts) is encoded once and saved as one
safetensors file holding ``mean`` and ``variance``. The file name is derived
from the member's ``fingerprint()`` (weights, posterior and settings), the text
kind and a SHA-256 over the texts. A changed model, posterior or data set
therefore never reuses a stale file. Re-running an evaluation with other
methods or settings reads the files instead of running the encoders again.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from uec_rag._io import atomic_file, cache_dir
from uec_rag.encoders.base import ProbabilisticMember, check_kind, check_texts
from uec_rag.gaussian import GaussianEmbedding

__all__ = ["EmbeddingStore", "texts_digest"]

logger = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def texts_digest(texts: Sequence[str]) -> str:
    """SHA-256 (hex) of a list of texts, each prefixed by its UTF-8 length."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


class EmbeddingStore:
    """Encode texts with a member, or read the embeddings saved by an earlier run.

    Parameters
    ----------
    root : Path or None, default None
        Folder of the store; ``<cache_dir()>/eval_embeddings`` when None.
    enabled : bool, default True
        When False, nothing is read or written and every call encodes.
    """

    def __init__(self, root: Path | None = None, *, enabled: bool = True) -> None:
        self.root = Path(root) if root is not None else cache_dir() / "eval_embeddings"
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def path_for(self, member: ProbabilisticMember, texts: Sequence[str], kind: str) -> Path:
        """Return the file that contains ``member``'s embeddings of ``texts`` as ``kind``."""
        # A member loaded from a folder is named by its path; its last part is enough here.
        label = _SAFE_NAME.sub("_", Path(member.name).name)[:40] or "member"
        fingerprint = member.fingerprint()
        return (
            self.root
            / f"{label}-{fingerprint[:16]}"
            / f"{check_kind(kind)}-{len(texts)}-{texts_digest(texts)[:32]}.safetensors"
        )

    def encode(
        self,
        member: ProbabilisticMember,
        texts: Sequence[str],
        kind: str,
        *,
        description: str = "",
        batch_size: int | None = None,
    ) -> GaussianEmbedding:
        """Return ``member.encode(texts, kind)``, read from the store when present.

        A stored file whose shape does not match ``[len(texts), member.dim]``,
        or that cannot be parsed, is logged, ignored and overwritten.
        """
        items = check_texts(texts)
        path = self.path_for(member, items, kind)
        if self.enabled and path.is_file():
            stored = self._read(path, len(items), member.dim)
            if stored is not None:
                self.hits += 1
                logger.debug("read %s embeddings of %s from %s", member.name, description, path)
                return stored

        self.misses += 1
        logger.info(
            "encoding %d %s texts of %s with %s",
            len(items),
            kind,
            description or "a data set",
            member.name,
        )
        embedding = member.encode(items, kind, batch_size=batch_size, show_progress=True)
        if self.enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as tmp:
                save_file(
                    {"mean": embedding.mean, "variance": embedding.variance},
                    str(tmp),
                    metadata={
                        "member": member.name,
                        "fingerprint": member.fingerprint(),
                        "kind": kind,
                        "description": description,
                    },
                )
        return embedding

    @staticmethod
    def _read(path: Path, count: int, dim: int) -> GaussianEmbedding | None:
        try:
            tensors = load_file(str(path))
            embedding = GaussianEmbedding(tensors["mean"], tensors["variance"])
        except (SafetensorError, KeyError, ValueError, OSError) as error:
            logger.warning("ignoring unreadable stored embeddings %s: %s", path, error)
            return None
        if embedding.mean.shape != (count, dim):
            logger.warning(
                "ignoring stored embeddings %s: shape %s, expected %s",
                path,
                embedding.mean.shape,
                (count, dim),
            )
            return None
        return embedding
