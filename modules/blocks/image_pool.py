"""The history of generated images a discriminator also trains on (Shrivastava et al. 2017,
"Learning from Simulated and Unsupervised Images through Adversarial Training", 3.2; CycleGAN,
Zhu et al. 2017, 4 "Training details": a buffer of the 50 previously generated images), so that D
does not forget the generator's earlier mistakes and the two networks oscillate less.

For each generated image: while the pool has room, it is stored and handed on; once full, with
probability 1/2 a stored image, drawn uniformly, is handed on instead and the new one takes its
place, and otherwise the new one is handed on and the pool is left as it is.

Each process keeps its own pool of the images it generated, as each of CycleGAN's GPUs would:
the draws come from the pool's own generator, seeded by (seed, rank), so that a run's draws do
not depend on what else consumes random numbers, and `state_dict` holds the images and the
generator's state, which a family gathers over ranks into its checkpoint (the gather is its
business: this module talks to no process group).
"""
from __future__ import annotations

import torch
from torch import Tensor


class ImagePool:
    def __init__(self, size: int = 50, seed: int = 0, rank: int = 0):
        if size < 0:
            raise ValueError(f"an image pool's size must be >= 0, got {size}")
        self.size = size
        self.images: list[Tensor] = []
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def query(self, images: Tensor) -> Tensor:
        """The batch D sees as fake: `images` with some replaced by older ones (see the module
        docstring). Images are stored detached, on the CPU; the result is on `images`' device
        and carries no gradient, as D's phase needs."""
        if self.size == 0:
            return images.detach()
        out = []
        for image in images.detach():
            if len(self.images) < self.size:
                self.images.append(image.cpu().clone())
                out.append(image)
                continue
            draw = torch.rand((), generator=self.generator).item()
            index = int(torch.randint(self.size, (), generator=self.generator))
            if draw < 0.5:
                out.append(self.images[index].to(image.device, image.dtype))
                self.images[index] = image.cpu().clone()
            else:
                out.append(image)
        return torch.stack(out)

    def state_dict(self) -> dict:
        stored = torch.stack(self.images) if self.images else torch.empty(0)
        return {"size": self.size, "images": stored, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size:
            raise ValueError(f"the checkpoint's image pool holds {state['size']} images, this run's {self.size}")
        self.images = list(state["images"].unbind(0)) if state["images"].numel() else []
        self.generator.set_state(state["generator"])
