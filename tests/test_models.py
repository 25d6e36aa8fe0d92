"""The model ladder: parameter counts, forward/backward, presets with inhibition, bad inputs."""

from __future__ import annotations

import pytest
import torch

import memel
from memel.models import (
    InputError,
    build,
    causal_lm_loss,
    count_parameters,
    get_config,
    list_models,
    preset_targets,
    presets,
)

torch.set_num_threads(2)

PYTHIA_COUNTS = {
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "pythia-1b": 1_011_781_632,
    "pythia-1.4b": 1_414_647_808,
    "pythia-2.8b": 2_775_208_960,
    "pythia-6.9b": 6_857_302_016,
    "pythia-12b": 11_846_072_320,
}


@pytest.mark.parametrize("name,expected", PYTHIA_COUNTS.items())
def test_pythia_parameter_counts(name: str, expected: int) -> None:
    assert count_parameters(name) == expected


def test_other_published_counts() -> None:
    # BertForSequenceClassification(bert-base-uncased, 2 labels) and timm ViT-B/16, ViT-Ti/16.
    assert count_parameters("bert-base") == 109_483_778
    assert count_parameters("bert-tiny") == 4_386_178
    imagenet = {"image_size": 224, "patch_size": 16, "in_channels": 3, "num_classes": 1000}
    assert count_parameters("vit-base", **imagenet) == 86_567_656
    assert count_parameters("vit-tiny", **imagenet) == 5_717_416


def test_byte_rungs_sizes() -> None:
    sizes = {row.name: row.parameters for row in list_models("decoder")}
    assert 0.15e6 < sizes["byte-0.2m"] < 0.3e6
    assert 0.8e6 < sizes["byte-1m"] < 1.3e6
    assert 3.5e6 < sizes["byte-4m"] < 4.5e6


def test_list_models_rows_cover_every_family() -> None:
    rows = list_models()
    assert {row.family for row in rows} == {"decoder", "encoder", "vit", "cnn", "convgru"}
    assert all(row.parameters > 0 and row.presets for row in rows)


def test_meta_build_allocates_nothing() -> None:
    model = build("pythia-12b", device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())


# ---------------------------------------------------------------------------------------
# forward / backward at tiny sizes
def _inputs(name: str, batch: int = 2) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = build(name)
    family = get_config(name)
    kind = type(family).__name__
    if kind == "DecoderConfig":
        return model, (torch.randint(0, family.vocab_size, (batch, 16)),)
    if kind == "EncoderConfig":
        return model, (torch.randint(0, family.vocab_size, (batch, 12)),)
    if kind == "ConvGRUConfig":
        return model, (torch.rand(batch, 3, 1, 32, 32),)
    return model, (torch.rand(batch, 1, 8, 8),)


def _loss(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if isinstance(model, memel.models.ConvGRUNowcaster):
        out = model(*inputs, out_frames=2)
        assert out.shape == (inputs[0].shape[0], 2, 1, 32, 32)
        assert 0.0 <= out.min() and out.max() <= 1.0
        return memel.models.b_mse(out, inputs[0][:, :2], reduction="frame_mean")
    out = model(*inputs)
    if isinstance(model, memel.models.DecoderLM):
        assert out.shape == (*inputs[0].shape, model.config.vocab_size)
        return causal_lm_loss(out, inputs[0])
    assert out.dim() == 2 and out.shape[0] == inputs[0].shape[0]
    return out.logsumexp(-1).mean()


TINY = [
    "byte-0.2m",
    "pythia-14m",
    "bert-byte-tiny",
    "bert-tiny",
    "vit-micro",
    "vit-tiny",
    "cnn-tiny",
    "cnn-small",
    "convgru",
]


@pytest.mark.parametrize("name", TINY)
def test_forward_backward(name: str) -> None:
    model, inputs = _inputs(name)
    model.train()
    loss = _loss(model, inputs)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_decoder_is_causal() -> None:
    torch.manual_seed(0)
    model = build("byte-0.2m").eval()
    ids = torch.randint(0, 256, (1, 20))
    changed = ids.clone()
    changed[0, 12] = (ids[0, 12] + 1) % 256
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_decoder_layout_matches_gpt_neox() -> None:
    model = build("byte-0.2m", device="meta")
    names = dict(model.named_parameters())
    assert "embed_out.bias" not in names and "embed_out.weight" in names
    assert names["layers.0.attention.query_key_value.weight"].shape == (3 * 64, 64)
    assert "layers.0.attention.query_key_value.bias" in names and "layers.0.attention.dense.bias" in names
    assert isinstance(model.layers[0].mlp.act, torch.nn.GELU)
    assert model.layers[0].attention.rotary.dims == 4  # 25% of head_dim 16


def test_encoder_attention_mask_ignores_padding() -> None:
    torch.manual_seed(0)
    model = build("bert-byte-tiny").eval()
    ids = torch.randint(0, 256, (1, 10))
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, 7:] = 0
    other = ids.clone()
    other[0, 8] = (ids[0, 8] + 5) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask), model(other, attention_mask=mask))


# ---------------------------------------------------------------------------------------
# presets with inhibition inserted
PRESET_CASES = [
    ("byte-1m", {}, "mlp", 5),
    ("byte-1m", {}, "mid_mlp", 2),
    ("byte-1m", {}, "mid_attn4", 4),
    ("byte-0.2m", {"n_layers": 2}, "mid_attn4", 2),
    ("pythia-14m", {}, "mid_mlp", 3),
    ("bert-byte-tiny", {}, "mid_attn4", 2),
    ("bert-byte-mini", {}, "mid_attn4", 4),
    ("vit-micro", {}, "mid_blocks", 2),
    ("vit-tiny", {}, "mid_blocks", 6),
    ("cnn-small", {}, "mid_blocks", 1),
    ("cnn-base", {}, "mid_blocks", 2),
    ("convgru", {}, "hidden", 6),
]


@pytest.mark.parametrize("name,overrides,preset,expected", PRESET_CASES)
def test_presets_insert_inhibitors_and_train(name: str, overrides: dict, preset: str, expected: int) -> None:
    torch.manual_seed(0)
    model = build(name, **overrides)
    patterns = preset_targets(model, preset)
    inserted = memel.inhibit(model, patterns, memel.InhibitionConfig(late_start=0))
    assert len(inserted) == expected
    _, inputs = _inputs(name)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        loss = _loss(model, inputs)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert all(m.initialized for m in inserted.values())
    assert sorted(memel.remove(model)) == sorted(inserted)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("pythia-160m", [f"layers.{i}" for i in (4, 5, 6, 7)]),  # BERT-base-like 12 layers: blocks 4-7, as the authors
        ("byte-1m", [f"layers.{i}" for i in range(4)]),  # 4 of its 5 layers
        ("bert-byte-mini", [f"layers.{i}" for i in range(4)]),
        ("bert-base", [f"layers.{i}" for i in (4, 5, 6, 7)]),
        ("vit-tiny", [f"blocks.{i}" for i in (4, 5, 6, 7)]),
        ("convgru", [f"{part}.cells.{i}" for part in ("encoder", "forecaster") for i in range(3)]),
    ],
)
def test_paper_preset_is_the_middle_block_outputs(name: str, expected: list[str]) -> None:
    assert preset_targets(name, "paper") == expected


@pytest.mark.parametrize("name", ["byte-1m", "pythia-14m", "bert-byte-mini", "vit-micro", "convgru"])
def test_paper_preset_modifies_one_value_per_sample(name: str) -> None:
    """The paper preset's targets resolve and take an Inhibitor whose input is the block's output
    (the residual stream / the cell's hidden state); with layout element and top-1, every call
    modifies exactly one value per sample (one sequence or image)."""
    model, inputs = _inputs(name, batch=3)
    from memel.training import TrainSpec

    data = {"vit-micro": {"kind": "digits"}, "convgru": {"kind": "nowcast"}}.get(
        name, {"kind": "text_lm", "corpus": "shakespeare", "seq_len": 16}
    )
    spec = TrainSpec(
        model={"name": name, "preset": "paper"}, inhibition={"mode": "naive_a", "late_start": 1}, data=data
    )
    assert spec.inhibition.layout == "element" and spec.inhibition.top_n == 1
    inserted = memel.inhibit(
        model, preset_targets(name, "paper"), spec.inhibition.model_copy(update={"kernel": "eager"})
    )
    modules = dict(model.named_modules())
    block_out: dict[str, list[torch.Tensor]] = {n: [] for n in inserted}
    inhibitor_in: dict[str, list[torch.Tensor]] = {n: [] for n in inserted}
    changed: dict[str, list[torch.Tensor]] = {n: [] for n in inserted}
    model.train()
    _loss(model, inputs)  # the first training call only starts the statistics (late_start=1)
    for target, inhibitor in inserted.items():
        # runs before the Inhibitor's hook on the block: the block's own output
        modules[target].register_forward_hook(
            lambda _m, _a, out, t=target: block_out[t].append(out.detach().clone()), prepend=True
        )

        def record(_m: torch.nn.Module, args: tuple, out: torch.Tensor, t: str = target) -> None:
            inhibitor_in[t].append(args[0].detach().clone())
            changed[t].append((out != args[0]).reshape(args[0].shape[0], -1).sum(1))

        inhibitor.register_forward_hook(record)
    _loss(model, inputs)
    for target in inserted:
        assert changed[target], target
        assert all(torch.equal(c, torch.ones(3, dtype=c.dtype)) for c in changed[target]), (target, changed[target])
        assert all(torch.equal(a, b) for a, b in zip(block_out[target], inhibitor_in[target], strict=True))
        assert (
            block_out[target][0].shape[0] == 3 and block_out[target][0].dim() >= 3
        )  # [batch, positions, channels] / [batch, C, H, W]


def test_a_paper_preset_with_layout_channel_is_refused() -> None:
    from memel.training import TrainSpec

    with pytest.raises(
        memel.ConfigError,
        match=r"inhibition.layout: 'channel' contradicts model.preset 'paper'.*set inhibition.layout: element",
    ):
        TrainSpec(model={"name": "byte-1m", "preset": "paper"}, inhibition={"layout": "channel"})
    assert (
        TrainSpec(model={"name": "byte-1m", "preset": "paper"}, inhibition={"layout": "element"}).inhibition.layout
        == "element"
    )
    assert (
        TrainSpec(model={"name": "byte-1m", "preset": "mlp"}).inhibition.layout == "channel"
    )  # other presets: unchanged
    with pytest.raises(memel.ConfigError, match=r"unknown preset 'paper'; allowed for this model: blocks, mid_blocks"):
        TrainSpec(model={"name": "cnn-tiny", "preset": "paper"}, data={"kind": "digits"})


def test_mid_layers_are_the_middle_ones() -> None:
    assert preset_targets("pythia-70m", "mid_attn4") == [f"layers.{i}.attention.dense" for i in (1, 2, 3, 4)]
    assert preset_targets("pythia-160m", "mid_mlp") == [f"layers.{i}.mlp.act" for i in range(3, 9)]
    assert preset_targets("pythia-160m", "mlp") == ["layers.*.mlp.act"]
    assert presets("convgru")["hidden"][0] == "encoder.cells.0"


# ---------------------------------------------------------------------------------------
# bad inputs
def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(memel.ConfigError, match=r"unknown name 'gpt-5'.*pythia-70m.*convgru"):
        build("gpt-5")


def test_unknown_override_is_rejected_by_name() -> None:
    with pytest.raises(memel.ConfigError, match=r"n_layer: unknown field; allowed fields: .*n_layers"):
        build("byte-1m", n_layer=3)


def test_bad_override_value_names_field_and_value() -> None:
    with pytest.raises(memel.ConfigError, match=r"d_model=128 must be a multiple of n_heads=3"):
        build("byte-1m", n_heads=3)
    with pytest.raises(memel.ConfigError, match=r"n_layers.*got 0"):
        get_config("byte-1m", n_layers=0)


def test_unknown_preset_lists_allowed() -> None:
    with pytest.raises(memel.ConfigError, match=r"unknown preset 'attn'.*mlp, mid_mlp, mid_attn4"):
        preset_targets("byte-1m", "attn")


def test_seq_len_beyond_context() -> None:
    model = build("byte-0.2m")
    with pytest.raises(InputError, match=r"seq_len=257 exceeds .*context_length=256"):
        model(torch.zeros(1, 257, dtype=torch.long))
    encoder = build("bert-byte-tiny")
    with pytest.raises(InputError, match=r"seq_len=300 .*max_positions=256"):
        encoder(torch.zeros(1, 300, dtype=torch.long))


def test_image_size_that_does_not_fit() -> None:
    with pytest.raises(memel.ConfigError, match=r"image_size=9 is not a multiple of patch_size=2"):
        build("vit-micro", image_size=9)
    model = build("vit-micro")
    with pytest.raises(InputError, match=r"image_size=8, patch_size=2"):
        model(torch.rand(1, 1, 12, 12))
    with pytest.raises(InputError, match=r"in_channels=1"):
        model(torch.rand(1, 3, 8, 8))
    with pytest.raises(memel.ConfigError, match=r"image_size=6 must be divisible by 4"):
        build("cnn-small", image_size=6)
    with pytest.raises(InputError, match=r"height=30 and width=30 must be multiples of 8"):
        build("convgru")(torch.rand(1, 2, 1, 30, 30))


def test_cli_models_table() -> None:
    from typer.testing import CliRunner

    import memel.commands.models  # noqa: F401  (registers the command)
    from memel.commands.app import app

    result = CliRunner().invoke(app, ["models", "--family", "decoder"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "70,426,624" in result.output and "byte-1m" in result.output
    assert "Example" in CliRunner().invoke(app, ["models", "--help"]).output
    assert CliRunner().invoke(app, ["models", "--family", "nope"]).exit_code != 0
