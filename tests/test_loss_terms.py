"""Combined losses (``loss.terms``) on models with several heads (``model.heads``).

The trainer's sum of weighted terms, each on its own head, with a memory, a proxy loss,
the adversarial term between two heads and a margin loss on pseudo-labels, must give on
R = 2 gloo ranks, with and without exact accumulation, the gradients of one process
computing that sum by hand on the concatenated batch (float64).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from dmlray import losses
from dmlray.config import ConfigError, config_from_dict
from dmlray.models import EmbeddingModel, HeadSpec
from dmlray.models.glyph_cnn import GlyphCNN
from dmlray.training.memory import CrossBatchMemory
from dmlray.training.pseudo_labels import PseudoLabels
from dmlray.training.trainer import LossTerm, Trainer

LOCAL_BATCH = 8  # b rows per micro-batch per rank: 4 classes × 2
STEPS = 2
MEMORY = 40  # smaller than the 2 steps' rows at R = 2, n = 2: the ring wraps
HEADS = (HeadSpec("a", 6), HeadSpec("b", 5, hidden_dim=7))
CLUSTERS = 3
WEIGHTS = {"ms": 1.0, "proxy": 0.5, "adversarial": 2.0, "cluster": 0.7}


def make_model() -> EmbeddingModel:
    torch.manual_seed(0)
    # no BatchNorm: batch statistics are per rank by design (frozen or SyncBN in recipes)
    return EmbeddingModel(GlyphCNN(in_channels=1, width=4, norm="none"), 0, heads=HEADS).double()


def make_losses() -> dict[str, losses.PairLoss]:
    """Same initial loss parameters (proxies, regressor, β) and sampling seed in every process."""
    torch.manual_seed(2)
    return {
        "ms": losses.build("multi_similarity").double(),
        "proxy": losses.build("proxy_anchor", num_classes=4, embedding_dim=5).double(),
        "adversarial": losses.build("adversarial", embedding_dim=6, aux_dim=5, proj_dim=4).double(),
        "cluster": losses.build("margin", num_classes=CLUSTERS, embedding_dim=5, seed=3).double(),
    }


def make_data(world_size: int, n: int) -> list[list[list[tuple]]]:
    """data[step][rank][micro] = (images, labels, keys), the same in every process."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for step in range(STEPS):
        ranks = []
        for rank in range(world_size):
            micro = []
            for m in range(n):
                labels = torch.arange(4).repeat(2)[torch.randperm(LOCAL_BATCH, generator=gen)]
                images = torch.randn(LOCAL_BATCH, 1, 8, 8, generator=gen, dtype=torch.float64)
                keys = [f"s{step}-r{rank}-m{m}-{i}" for i in range(LOCAL_BATCH)]
                micro.append((images, labels, keys))
            ranks.append(micro)
        out.append(ranks)
    return out


class FixedClusters:
    """PseudoLabels clustered once, from fixed random embeddings of every key (never refreshed)."""

    def __init__(self, keys: list[str]):
        self.labels = PseudoLabels(CLUSTERS)
        embeddings = torch.randn(len(keys), 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        self.labels.refresh(keys, embeddings, seed=0)

    def update(self, step: int) -> None:
        pass

    def lookup(self, keys) -> torch.Tensor:
        return self.labels.lookup(keys)

    def state_dict(self) -> dict:
        return self.labels.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.labels.load_state_dict(state)


def all_keys(world_size: int, n: int) -> list[str]:
    return [k for ranks in make_data(world_size, n) for micro in ranks for _, _, keys in micro for k in keys]


def make_terms(model: EmbeddingModel) -> list[LossTerm]:
    fns = make_losses()
    a, b = model.columns("a"), model.columns("b")
    return [
        LossTerm("ms", fns["ms"], WEIGHTS["ms"], a, memory=CrossBatchMemory(MEMORY, 6, dtype=torch.float64)),
        LossTerm("proxy", fns["proxy"], WEIGHTS["proxy"], b),
        LossTerm("adversarial", fns["adversarial"], WEIGHTS["adversarial"], a, other_columns=b),
        LossTerm("cluster", fns["cluster"], WEIGHTS["cluster"], b, pseudo_labels=True),
    ]


def snapshot(model, trainer: Trainer, loss: torch.Tensor, terms: dict) -> dict:
    return {
        "loss": loss.detach().clone(),
        "terms": {k: v.detach().clone() for k, v in terms.items()},
        "grad": torch.cat([p.grad.flatten() for p in model.parameters()]).clone(),
        "loss_grad": [p.grad.clone() for p in trainer.loss_fn.parameters() if p.grad is not None],
    }


def run_trainer(n: int, rank: int, world_size: int) -> list[dict]:
    """STEPS steps of the real Trainer on this rank's micro-batches (exact accumulation when n > 1)."""
    model = make_model()
    net = DistributedDataParallel(model) if world_size > 1 else model
    terms = make_terms(model)
    params = [*model.parameters(), *(p for t in terms for p in t.loss_fn.parameters())]
    trainer = Trainer(
        model=net,
        raw_model=model,
        terms=terms,
        pseudo_labels=FixedClusters(all_keys(world_size, n)),
        optimizer=torch.optim.SGD(params, lr=0.5),
        scheduler=None,
        batches=lambda start: iter(()),
        steps=STEPS,
        device=torch.device("cpu"),
        dtype=torch.float64,
        accumulate=n,
    )
    out = []
    for ranks in make_data(world_size, n):
        result = trainer.train_step(ranks[rank])
        out.append(snapshot(model, trainer, result.loss, result.terms))
    return out


def reference(n: int, world_size: int) -> list[dict]:
    """One process, each term written out on the concatenated n·R·b batch (rank-major order)."""
    model = make_model()
    fns = make_losses()
    module = torch.nn.ModuleDict(fns)
    optimizer = torch.optim.SGD([*model.parameters(), *module.parameters()], lr=0.5)
    memory = CrossBatchMemory(MEMORY, 6, dtype=torch.float64)
    clusters = FixedClusters(all_keys(world_size, n))
    out = []
    for ranks in make_data(world_size, n):
        optimizer.zero_grad()
        micro = [m for chunks in ranks for m in chunks]
        out_all = model(torch.cat([x for x, _, _ in micro]))
        labels = torch.cat([y for _, y, _ in micro])
        pseudo = clusters.lookup([k for _, _, keys in micro for k in keys])
        a, b = out_all[:, :6], out_all[:, 6:]
        slots = memory.enqueue(a.detach(), labels)
        mem_emb, mem_labels = memory.contents()
        terms = {
            "ms": fns["ms"](a, labels) + fns["ms"](a, labels, mem_emb, mem_labels, slots),
            "proxy": fns["proxy"](b, labels),
            "adversarial": fns["adversarial"].between(a, b),
            "cluster": fns["cluster"](b, pseudo),
        }
        loss = sum(WEIGHTS[k] * v for k, v in terms.items())
        loss.backward()
        out.append(
            {
                "loss": loss.detach(),
                "terms": {k: v.detach() for k, v in terms.items()},
                "grad": torch.cat([p.grad.flatten() for p in model.parameters()]).clone(),
                "loss_grad": [p.grad.clone() for p in module.parameters() if p.grad is not None],
            }
        )
        optimizer.step()
    return out


def check(n: int, ranks: list[list[dict]], ref: list[dict]) -> None:
    world_size = len(ranks)
    for step, expected in enumerate(ref):
        where = f"R={world_size} accumulate={n} step {step}"
        # each rank's loss is its share (or, for whole-batch terms, the whole): their mean is the global loss
        mean_loss = sum(r[step]["loss"] for r in ranks) / world_size
        torch.testing.assert_close(mean_loss, expected["loss"], rtol=1e-9, atol=1e-12, msg=where)
        for key, want in expected["terms"].items():
            got = sum(r[step]["terms"][key] for r in ranks) / world_size
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=f"{where} (term {key})")
        assert expected["grad"].abs().sum() > 0, f"{where}: degenerate reference"
        for rank in ranks:
            torch.testing.assert_close(rank[step]["grad"], expected["grad"], rtol=1e-6, atol=1e-12, msg=where)
            assert len(rank[step]["loss_grad"]) == len(expected["loss_grad"]), where
            for got, want in zip(rank[step]["loss_grad"], expected["loss_grad"], strict=True):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12, msg=f"{where} (loss parameters)")


ACCUMULATE = [1, 2]


def _worker(rank: int, world_size: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        torch.save({n: run_trainer(n, rank, world_size) for n in ACCUMULATE}, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_every_term_kind_is_in_the_combination():
    fns = make_losses()
    assert fns["ms"].supports_references and fns["ms"].rank_decomposable  # gathered, with memory
    assert not fns["proxy"].supports_references and not fns["proxy"].rank_decomposable  # whole batch, proxies
    assert not fns["cluster"].rank_decomposable  # sampled over the whole batch, β per cluster
    assert not losses.loss_class("adversarial").trainable_alone  # two heads
    assert len(set(make_model().head_specs)) == 2


@pytest.mark.parametrize("n", ACCUMULATE)
def test_one_process_trainer_matches_the_terms_written_out(n):
    check(n, [run_trainer(n, 0, 1)], reference(n, 1))


def test_two_ranks_match_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "res")), nprocs=2, join=True)
    ranks = [torch.load(f"{tmp_path / 'res'}.{r}", weights_only=False) for r in range(2)]
    for n in ACCUMULATE:
        check(n, [r[n] for r in ranks], reference(n, 2))


# ------------------------------------------------------------------ the trainer's records and state


def test_records_each_term_and_their_weighted_sum():
    model = make_model()
    data = make_data(1, 1)
    trainer = Trainer(
        model=model,
        terms=make_terms(model),
        pseudo_labels=FixedClusters(all_keys(1, 1)),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        scheduler=None,
        batches=lambda start: iter([ranks[0][0] for ranks in data[start:]]),
        steps=STEPS,
        device=torch.device("cpu"),
        dtype=torch.float64,
        log_every=1,
    )
    history = trainer.train()
    reference_terms = reference(1, 1)[0]["terms"]  # the first step starts from the same weights
    for key, want in reference_terms.items():
        assert history[0][f"loss/{key}"] == pytest.approx(want.item(), rel=1e-9)
    for record in history:
        total = sum(WEIGHTS[k] * record[f"loss/{k}"] for k in WEIGHTS)
        assert record["loss"] == pytest.approx(total, rel=1e-9)
        assert record["memory_loss"] is not None and record["memory_fill"] > 0

    resumed = Trainer(
        model=make_model(),
        terms=make_terms(make_model()),
        pseudo_labels=FixedClusters(all_keys(1, 1)[:5]),  # another clustering: replaced by the state
        optimizer=torch.optim.SGD(make_model().parameters(), lr=0.1),
        scheduler=None,
        batches=lambda start: iter(()),
        steps=STEPS,
        device=torch.device("cpu"),
        dtype=torch.float64,
    )
    state = trainer.state_dict()
    assert set(state["term_memories"]) == {"ms"} and state["memory"] is None
    assert set(state["loss"]) >= {"proxy.proxies", "cluster.beta"}  # every term's parameters
    resumed.load_state_dict(state)
    got, want = resumed.terms[0].memory, trainer.terms[0].memory
    assert got is not None and want is not None and torch.equal(got.contents()[0], want.contents()[0])
    keys = all_keys(1, 1)
    assert torch.equal(resumed.pseudo_labels.lookup(keys), trainer.pseudo_labels.lookup(keys))
    for p, q in zip(resumed.loss_fn.parameters(), trainer.loss_fn.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_trainer_takes_a_loss_or_terms():
    model = make_model()
    common = dict(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        scheduler=None,
        batches=lambda start: iter(()),
        steps=1,
        device=torch.device("cpu"),
    )
    with pytest.raises(ValueError, match="either loss_fn"):
        Trainer(**common)
    with pytest.raises(ValueError, match="either loss_fn"):
        Trainer(loss_fn=losses.build("multi_similarity"), terms=make_terms(model), **common)
    twice = [LossTerm("x", losses.build("contrastive")), LossTerm("x", losses.build("contrastive"))]
    with pytest.raises(ValueError, match="keys must differ"):
        Trainer(terms=twice, **common)


# ------------------------------------------------------------------ models with several heads


def test_one_head_model_keeps_its_parameter_names_and_output():
    torch.manual_seed(0)
    single = EmbeddingModel(GlyphCNN(in_channels=1, width=4), embedding_dim=8)
    assert [k for k in single.state_dict() if not k.startswith("backbone.")] == ["head.proj.weight", "head.proj.bias"]
    assert single.view() is single and single.columns() == slice(0, 8)
    torch.manual_seed(0)
    two = EmbeddingModel(GlyphCNN(in_channels=1, width=4), 0, heads=[HeadSpec("class", 8), HeadSpec("aux", 3, 5)])
    heads = [k for k in two.state_dict() if not k.startswith("backbone.")]
    assert heads[:2] == ["head.proj.weight", "head.proj.bias"]
    assert all(k.startswith("extra_heads.aux.") for k in heads[2:]) and len(heads) == 6
    # the first head of a two-head model is the one-head model: a one-head checkpoint's keys fit it
    assert two.load_state_dict(single.state_dict(), strict=False).unexpected_keys == []
    x = torch.randn(5, 1, 16, 16)
    single.eval(), two.eval()
    out = two(x)
    assert out.shape == (5, 11) and two.embedding_dim == 11
    torch.testing.assert_close(out[:, :8], single(x))
    torch.testing.assert_close(out[:, 8:].norm(dim=1), torch.ones(5))  # each head on its own sphere
    aux = two.view("aux")
    assert aux.embedding_dim == 3 and aux.backbone is two.backbone
    torch.testing.assert_close(aux(x), out[:, 8:])
    torch.testing.assert_close(two.view()(x), single(x))  # the default view is the first head
    with pytest.raises(KeyError, match="unknown head 'nope'; heads: class, aux"):
        two.view("nope")
    groups = {g["name"]: g["params"] for g in two.param_groups(1e-3, 1e-2)}
    assert len(groups["head"]) == len(heads) == 6  # both heads (aux an MLP) at the head learning rate


# ------------------------------------------------------------------ config

MIC_TERMS = [
    {"id": "class", "name": "margin", "head": "class"},
    {"id": "aux", "name": "margin", "head": "aux", "labels": "pseudo", "weight": 0.8},
    {"name": "adversarial", "head": "class", "other_head": "aux", "weight": 50.0},
]
TWO_HEADS = {"heads": [{"name": "class", "dim": 16}, {"name": "aux", "dim": 8}]}


def test_terms_and_heads_parse_into_typed_sections():
    cfg = config_from_dict({"model": TWO_HEADS, "loss": {"terms": MIC_TERMS}, "pseudo_labels": {"clusters": 5}})
    assert [h.dim for h in cfg.model.heads] == [16, 8]
    assert [t.labels for t in cfg.loss.terms] == ["class", "pseudo", "class"]
    assert cfg.loss.terms[2].weight == 50.0 and cfg.loss.terms[2].params == {}
    assert config_from_dict({}).loss.terms == [] and config_from_dict({}).model.heads == []


BAD = [
    ({"loss": {"terms": [{"name": "contrastive", "head": "nope"}]}}, r"loss\.terms\[0\]\.head: unknown head 'nope'"),
    ({"loss": {"terms": [{"name": "contrastive", "wieght": 1}]}}, r"unknown config key 'loss\.terms\[0\]\.wieght'"),
    ({"loss": {"terms": [{"name": "contrastive"}, {"name": "nope"}]}}, r"loss\.terms\[1\]\.name: unknown loss 'nope'"),
    ({"loss": {"terms": [{"name": "contrastive"}, {"name": "adversarial"}]}}, r"loss\.terms\[1\]\.other_head: .*needs"),
    ({"loss": {"terms": [{"name": "contrastive", "other_head": "embedding"}]}}, r"loss\.terms\[0\]\.other_head"),
    ({"loss": {"terms": [{"name": "contrastive"}, {"name": "contrastive"}]}}, r"loss\.terms\[1\]\.id: 'contrastive'"),
    ({"loss": {"terms": [{"name": "proxy_nca", "memory": True}]}, "memory": {"size": 64}}, r"terms\[0\]\.memory"),
    ({"loss": {"terms": [{"name": "contrastive", "memory": True}]}}, r"loss\.terms\[0\]\.memory: the memory is off"),
    ({"loss": {"terms": [{"name": "contrastive"}]}, "memory": {"size": 64}}, r"memory\.size: no loss term reads"),
    ({"loss": {"terms": [{"name": "contrastive", "labels": "cluster"}]}}, r"loss\.terms\[0\]\.labels must be class"),
    ({"loss": {"terms": [{"name": "contrastive", "weight": -1}]}}, r"loss\.terms\[0\]\.weight must be finite"),
    ({"loss": {"name": "adversarial"}}, r"loss\.name: 'adversarial' is an auxiliary term.*loss\.terms"),
    ({"pseudo_labels": {"clusters": 5}}, r"pseudo_labels: only loss\.terms with labels: pseudo"),
    ({"model": {"heads": [{"name": "a"}, {"name": "a"}]}}, r"model\.heads\[1\]\.name: 'a' names two heads"),
    ({"model": {"heads": [{"name": "a", "dim": 0}]}}, r"model\.heads\[0\]\.dim must be >= 1"),
    ({"model": {"eval_head": "aux"}}, r"model\.eval_head: unknown head 'aux'; heads: embedding"),
    ({"model": TWO_HEADS, "loss": {"terms": MIC_TERMS}, "pseudo_labels": {"head": "x"}}, r"pseudo_labels\.head"),
    ({"model": TWO_HEADS, "loss": {"terms": MIC_TERMS}, "pseudo_labels": {"every": 0}}, r"pseudo_labels\.every"),
]


@pytest.mark.parametrize(("data", "message"), BAD)
def test_config_errors_name_the_bad_key(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


# ------------------------------------------------------------------ MIC, trained for real on glyphs

MIC_STEPS, MIC_EVERY = 60, 20


def mic_config(data_url: str):
    from dmlray.config import load_config

    terms = ", ".join(
        [
            "{id: class, name: margin, head: class}",
            "{id: aux, name: margin, head: aux, labels: pseudo, weight: 0.8}",
            "{id: adversarial, name: adversarial, head: class, other_head: aux, weight: 50.0}",
        ]
    )
    return load_config(
        "demo",
        [
            f"data.url={data_url}",
            "run.num_workers=0",
            f"train.steps={MIC_STEPS}",
            f"train.eval_every={MIC_STEPS}",
            "train.log_every=10",
            "data.classes_per_batch=8",
            "data.class_buffer=16",
            "memory.size=0",
            "optim.milestones=[]",
            "optim.loss_lr=0.0005",
            "eval.baseline=false",
            "eval.nmi=false",
            "model.heads=[{name: class, dim: 32}, {name: aux, dim: 32}]",
            "model.eval_head=class",
            f"loss.terms=[{terms}]",
            "pseudo_labels.head=aux",
            "pseudo_labels.clusters=10",
            f"pseudo_labels.every={MIC_EVERY}",
        ],
    )


@pytest.mark.slow
def test_mic_trains_the_class_head_beyond_the_untrained_network(glyphs_small):
    """A short whole MIC run through the worker (stream with keys, pseudo-label refreshes,
    three terms, evaluation of the class head): the class head's held-out Recall@1 beats
    the untrained network's, and the checkpoint holds the clustering of the whole train split."""
    from dmlray.data.shards import read_manifest
    from dmlray.data.transforms import ImageTransform
    from dmlray.evaluation.embedding import embed_split, score
    from dmlray.jobs.worker import WorkerContext, build_model, build_trainer

    torch.set_num_threads(1)
    cfg = mic_config(glyphs_small)
    manifest = read_manifest(glyphs_small)
    torch.manual_seed(cfg.train.seed)  # the same initial weights the worker starts from
    untrained = build_model(cfg.model, cfg.data.channels).view("class")
    test = embed_split(
        untrained, manifest.shard_urls("test"), ImageTransform(32, 1, train=False), 256, torch.device("cpu")
    )
    untrained_recall = score(test, [1], nmi=False)["recall@1"]

    states = []
    trainer = build_trainer(cfg, WorkerContext(report=lambda record, history, state: states.append(state)))
    history = trainer.train()
    final = history[-1]
    assert final["step"] == MIC_STEPS
    assert all(f"loss/{key}" in final for key in ("class", "aux", "adversarial"))
    print(f"MIC glyphs: class-head Recall@1 {final['recall@1']:.3f}, untrained {untrained_recall:.3f}")
    assert final["recall@1"] > untrained_recall + 0.03, (
        f"MIC {final['recall@1']:.3f} vs untrained {untrained_recall:.3f}"
    )
    pseudo = states[-1]["pseudo_labels"]
    assert pseudo["generation"] == MIC_STEPS // MIC_EVERY  # refreshed before steps 0, 20 and 40
    assert pseudo["assignments"].numel() == manifest.num_samples("train")
    assert len(set(pseudo["assignments"].tolist())) == 10


@pytest.mark.slow
def test_a_resumed_mic_run_continues_with_its_checkpointed_clusters(glyphs_small):
    """Resumed from the checkpoint of step 10 (clustered at step 0), a MIC run looks the same
    labels up until its next refresh and ends where the uninterrupted run ends."""
    import copy

    from dmlray.jobs.worker import WorkerContext, build_trainer

    torch.set_num_threads(1)
    cfg = mic_config(glyphs_small)
    cfg.train.steps, cfg.train.eval_every, cfg.train.checkpoint_every = 30, 30, 10
    states: dict[int, dict] = {}

    def keep(record, history, state):
        if state is not None:
            states[record["step"]] = copy.deepcopy(state)  # the live tensors go on training

    whole = build_trainer(cfg, WorkerContext(report=keep))
    whole.train()
    resumed = build_trainer(cfg, WorkerContext(restored=states[10]))
    resumed.load_state_dict(states[10])
    assert resumed.pseudo_labels is not None and resumed.pseudo_labels.labels.generation == 1
    resumed.train()
    assert resumed.pseudo_labels.labels.generation == 2  # refreshed again before step 20, as the whole run
    assert torch.equal(states[30]["pseudo_labels"]["assignments"], resumed.state_dict()["pseudo_labels"]["assignments"])
    for (name, a), b in zip(whole.raw_model.state_dict().items(), resumed.raw_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    assert resumed.history[-1]["recall@1"] == pytest.approx(whole.history[-1]["recall@1"], abs=1e-6)


@pytest.mark.parametrize("eval_head", ["", "aux"])
def test_a_checkpoint_of_a_two_head_run_embeds_with_its_eval_head(tmp_path, eval_head):
    """``dmlray eval``/``index``/serving load a run through load_checkpoint_model: a
    two-head model comes back as the view of ``model.eval_head`` (the first by default)."""
    import yaml

    from dmlray.config import config_to_dict
    from dmlray.jobs.commands import load_checkpoint_model
    from dmlray.jobs.worker import build_model
    from dmlray.training.checkpoints import STATE_FILE, state_bytes

    cfg = config_from_dict({"model": {**TWO_HEADS, "eval_head": eval_head}})
    torch.manual_seed(1)
    model = build_model(cfg.model, cfg.data.channels).eval()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / STATE_FILE).write_bytes(state_bytes({"model": model.state_dict(), "step": 3}))
    _, state, loaded = load_checkpoint_model(str(tmp_path), str(tmp_path / "checkpoint"), None)
    assert state["step"] == 3
    x = torch.randn(4, 1, 32, 32)
    columns = slice(0, 16) if eval_head == "" else slice(16, 24)
    assert loaded.embedding_dim == columns.stop - columns.start
    torch.testing.assert_close(loaded.eval()(x), model(x)[:, columns])


@pytest.mark.parametrize("center", [False, True])
def test_pseudo_labels_are_the_clusters_of_the_training_split_by_the_named_head(glyphs_small, center):
    """The worker's pseudo-label source embeds the whole train split with pseudo_labels.head
    (optionally minus each class's mean) and k-means it with the run seed; it refreshes
    before step 0 and every ``every`` steps, not in between."""
    from dmlray.data.shards import read_manifest
    from dmlray.data.transforms import ImageTransform
    from dmlray.evaluation.clustering import kmeans
    from dmlray.evaluation.embedding import embed_split
    from dmlray.jobs.worker import build_model, pseudo_label_source

    cfg = mic_config(glyphs_small)
    cfg.pseudo_labels.center_first_by_class = center
    manifest = read_manifest(glyphs_small)
    model = build_model(cfg.model, cfg.data.channels)
    transform = ImageTransform(32, 1, train=False)
    source = pseudo_label_source(cfg, manifest, model, transform, torch.device("cpu"), set())
    assert source is not None
    source.update(0)
    split = embed_split(model.view("aux"), manifest.shard_urls("train"), transform, 256, torch.device("cpu"))
    order = sorted(range(len(split["keys"])), key=split["keys"].__getitem__)
    x, labels = split["embeddings"][order], split["labels"][order]
    if center:
        x = x.clone()
        for c in labels.unique():
            x[labels == c] -= split["embeddings"][order][labels == c].mean(dim=0)
    expected = kmeans(x, cfg.pseudo_labels.clusters, seed=cfg.train.seed)
    assert torch.equal(source.lookup([split["keys"][i] for i in order]), expected)
    source.update(MIC_EVERY - 1)
    assert source.labels.generation == 1
    source.update(MIC_EVERY)
    assert source.labels.generation == 2
    # later clusterings take the head's embeddings as they are, whichever the first did
    later = kmeans(split["embeddings"][order], cfg.pseudo_labels.clusters, seed=cfg.train.seed + 1)
    assert torch.equal(source.lookup([split["keys"][i] for i in order]), later)
