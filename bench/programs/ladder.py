"""The ladder: a multilevel DAG whose number of top-to-bottom paths doubles with each level.

Levels 0 … d−1 hold two problems each, ``a<k>`` and ``b<k>``; level d holds
``top``. Every problem at level k ≥ 1 reads the optima of both problems of
level k−1 (lower-to-upper edges), ``top`` reads both of level d−1, and the two
level-0 problems are constrained by θ_top (upper-to-lower edges):

    top ⇠ a<d−1>, b<d−1> ⇠ … ⇠ a1, b1 ⇠ a0, b0 ⇠ top

so there are 4d edges and 2^d paths from θ_top down to a level-0 optimum.
Each problem holds θ ∈ R^n (a module whose forward returns θ) and a quadratic
loss, so that Python and graph work, not FLOPs, dominate:

    C_q(θ_q; x) = ½‖θ_q − Σ_j W_qj x_j‖² + ½ θ_qᵀ D_q θ_q     (x_j: the problems q reads)
    C_top       = ½‖W_a θ*_a + W_b θ*_b − t‖² + ½ θ_topᵀ D_top θ_top

with D_q diagonal in [0.1, 1] (distinct curvatures, so that CG does not finish
before its last iteration; n = 8 > the 5 CG iterations).

All lower problems use the same method and SGD(0.1); ``top`` SGD(0.05). One
outer iteration: one step of every problem, bottom up. mlodsl visits each lower
problem once per step of ``top`` (2d method calls); Betty walks every path
(d·2^d method calls).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from bench import hand
from bench.common import CG_ITERATIONS, FD_EPS, NEUMANN_ITERATIONS
from bench.programs.mwn import BettyRunner, MlodslRunner, betty_config, mlodsl_method, quiet_betty

LR, TOP_LR = 0.1, 0.05


class Sizes(NamedTuple):
    dim: int = 8


class Point(nn.Module):
    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta)

    def forward(self) -> torch.Tensor:
        return self.theta


class Node(NamedTuple):
    name: str
    level: int
    module: Point
    reads: tuple[str, ...]        # the problems whose θ (optimum or parameters) the loss reads
    weights: tuple[torch.Tensor, ...]
    curvature: torch.Tensor       # the diagonal of D_q


class Ladder(NamedTuple):
    nodes: tuple[Node, ...]       # bottom up: a0, b0, a1, b1, …, top
    target: torch.Tensor

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)


def names(depth: int) -> list[list[str]]:
    return [[f"a{k}", f"b{k}"] for k in range(depth)] + [["top"]]


def edges(depth: int) -> int:
    return 4 * depth


def paths(depth: int) -> int:
    return 2 ** depth


def ladder(depth: int, sizes: Sizes, seed: int, dtype: torch.dtype) -> Ladder:
    g = torch.Generator().manual_seed(seed)
    n = sizes.dim
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    levels, nodes = names(depth), []
    for k, level in enumerate(levels):
        below = levels[k - 1] if k > 0 else ["top"]
        for name in level:
            weights = tuple(0.5 * rand(n, n) / n ** 0.5 for _ in below)
            curvature = 0.1 + 0.9 * torch.rand(n, generator=g, dtype=dtype)
            nodes.append(Node(name, k, Point(rand(n)), tuple(below), weights, curvature))
    return Ladder(tuple(nodes), rand(n))


def quadratic(node: Node, theta: torch.Tensor, xs: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    mixed = sum(w @ x for w, x in zip(node.weights, xs))
    fit = mixed - target if node.name == "top" else theta - mixed
    return 0.5 * (fit * fit).sum() + 0.5 * (node.curvature * theta * theta).sum()


def build(side: str, method: str, depth: int = 4, sizes: Sizes = Sizes(), seed: int = 0,
          dtype: torch.dtype = torch.float32):
    return {"hand": Hand, "mlodsl": build_mlodsl, "betty": build_betty}[side](method, ladder(depth, sizes, seed, dtype))


def optimizer(node: Node) -> torch.optim.SGD:
    return torch.optim.SGD(node.module.parameters(), lr=TOP_LR if node.name == "top" else LR)


def modules(lad: Ladder) -> dict[str, nn.Module]:
    return {n.name: n.module for n in lad.nodes}


def uppers(lad: Ladder, node: Node) -> list[str]:
    return [n.name for n in lad.nodes if n.level == node.level + 1]


# -- mlodsl ----------------------------------------------------------------------------------
def build_mlodsl(method: str, lad: Ladder) -> MlodslRunner:
    from mlodsl import Program, problem

    by_name: dict = {}

    def define(node: Node):
        top = node.name == "top"

        def loss():
            return quadratic(node, node.module(), [by_name[r]() for r in node.reads], lad.target)

        return problem(module=node.module, optimizer=optimizer(node), upper=[] if top else uppers(lad, node),
                       uses=list(node.reads), name=node.name,
                       hypergrad=None if top else mlodsl_method(method))(loss)

    for node in lad.nodes:
        by_name[node.name] = define(node)
    return MlodslRunner(Program(list(by_name.values())), modules(lad))


# -- hand-written ----------------------------------------------------------------------------
class Hand:
    """Each problem steps bottom up; then ``top``'s gradient is its direct part plus one reverse
    sweep over the levels, top down, each lower problem turning its accumulated adjoint into
    adjoints of what its loss reads."""

    def __init__(self, method: str, lad: Ladder) -> None:
        self.method, self.lad, self.modules = method, lad, modules(lad)
        self.opts = {n.name: optimizer(n) for n in lad.nodes}
        self.snaps: dict[str, tuple] = {}

    def loss(self, node: Node, theta: torch.Tensor | None = None, live: bool = False) -> torch.Tensor:
        own = node.module() if theta is None else functional_call(node.module, {"theta": theta}, ())
        with torch.set_grad_enabled(live):
            xs = [self.modules[r]() for r in node.reads]
        return quadratic(node, own, xs, self.lad.target)

    def run(self, n: int) -> None:
        for _ in range(n):
            self.iteration()

    def iteration(self) -> None:
        for node in self.lad.nodes[:-1]:
            params = [node.module.theta]
            if self.method == "itd":
                self.snaps[node.name] = hand.snapshot(self.opts[node.name], params)
            hand.apply(self.opts[node.name], params, hand.grads(self.loss(node), params))
        top = self.lad.nodes[-1]
        reads = [self.modules[r].theta for r in top.reads]
        g = hand.grads(self.loss(top, live=True), [top.module.theta] + reads)
        direct, adjoints = g[0], dict(zip(top.reads, ([t] for t in g[1:])))
        for node in sorted(self.lad.nodes[:-1], key=lambda n: -n.level):   # top down, a before b in a level
            inputs = [self.modules[r].theta for r in node.reads]
            out = hand.through(self.method, lambda th, node=node: self.loss(node, None if th is None else th[0], True),
                               [node.module.theta], inputs, adjoints.pop(node.name), lr=LR,
                               k_neumann=NEUMANN_ITERATIONS, k_cg=CG_ITERATIONS, fd_eps=FD_EPS,
                               snap=self.snaps.get(node.name), update=hand.update_for(self.opts[node.name]))
            for r, contribution in zip(node.reads, out):
                if r == "top":
                    direct = direct + contribution
                else:
                    adjoints[r] = [adjoints[r][0] + contribution] if r in adjoints else [contribution]
        hand.apply(self.opts["top"], [top.module.theta], [direct])


# -- Betty -----------------------------------------------------------------------------------
def build_betty(method: str, lad: Ladder) -> BettyRunner:
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    quiet_betty()

    class Quadratic(ImplicitProblem):
        node: Node

        def training_step(self, batch):
            xs = [getattr(self, r)() for r in self.node.reads]
            return quadratic(self.node, self.module(), xs, lad.target)

        def get_batch(self):
            return None

    problems = {}
    for node in lad.nodes:
        top = node.name == "top"
        config = Config(retain_graph=True) if top else betty_config(method, LR)
        p = Quadratic(name=node.name, module=node.module, optimizer=optimizer(node), config=config)
        p.node = node
        problems[node.name] = p
    l2u = {problems[n.name]: [problems[u] for u in uppers(lad, n)] for n in lad.nodes if n.name != "top"}
    u2l = {problems["top"]: [problems[n.name] for n in lad.nodes if n.level == 0]}
    engine = Engine(problems=list(problems.values()), config=EngineConfig(train_iters=1, strategy="cpu"),
                    dependencies={"u2l": u2l, "l2u": l2u})
    engine.train()
    return BettyRunner(engine, modules(lad))
